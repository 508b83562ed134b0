"""`attnlab serve`: the API contract (every endpoint, every error code), micro-batching that answers
each request its own results, equal to decoding it alone, a failure that stays in its request, the
API-key rule, graceful shutdown on SIGTERM/SIGINT, and the page in a real headless browser.

Every server here listens on 127.0.0.1 (a free port chosen by the system); every request loop is
bounded in count and time. The models are tiny, built and saved by a fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from helpers import tiny_transformer  # noqa: E402
from serving import SENTENCES, expected, make_runs, running  # noqa: E402

from attnlab.app.cli import main  # noqa: E402
from attnlab.app.serve import ServeConfig, load_models  # noqa: E402
from attnlab.app.serve_config import check_bind, is_loopback  # noqa: E402
from attnlab.decode.generate import generate  # noqa: E402
from attnlab.decode.nbest import translate_n_best  # noqa: E402
from attnlab.decode.translate import DecodeConfig, load_translator  # noqa: E402
from attnlab.inspect.explain import attention_maps, explain_translation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "s3cret-test-key"
TRANSLATE, GENERATE = "/v1/translate", "/v1/generate"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here decodes on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return make_runs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(runs):
    with running(runs, ServeConfig(port=0, batch_wait_ms=20)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def translator(runs):
    return load_translator(runs["translation"])


async def post_all(url: str, bodies: list[dict], path: str = "/v1/translate", headers=None) -> list[httpx.Response]:
    """Send every body at once (each on its own connection), bounded in time."""
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=len(bodies))) as c:
        return await asyncio.wait_for(asyncio.gather(*[c.post(path, json=b, headers=headers) for b in bodies]), 120)


def stats(client, name="de-en") -> dict:
    return client.get("/health").json()["models"][name]


# -- the endpoints ------------------------------------------------------------------------------


def test_health_and_models(client, translator):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert set(health.json()["models"]) == {"de-en", "shakespeare"}

    listed = client.get("/v1/models").json()
    by_name = {m["name"]: m for m in listed["models"]}
    tr, lm = by_name["de-en"], by_name["shakespeare"]
    assert (tr["kind"], lm["kind"]) == ("translation", "lm")
    assert tr["parameters"] == sum(p.numel() for p in translator.model.parameters())
    assert tr["config"]["d_model"] == 16 and tr["config"]["max_len"] == 40
    assert tr["vocabulary"] == {"source": {"kind": "char", "size": len(translator.src_vocab)}, "shared": True}
    assert tr["languages"] == {"source": "de", "target": "en"}
    assert tr["training"] == {"steps": 1, "val_bleu": 0.5}  # the run's summary.json
    assert lm["training"] is None  # a bare checkpoint has none
    assert listed["limits"]["max_beam"] == ServeConfig().max_beam
    assert listed["batching"]["enabled"] is True


def test_translate_equals_the_translator_and_the_command_line(client, translator, runs, capsys):
    sentences = [SENTENCES[0], "", SENTENCES[2], SENTENCES[1]]
    want = expected(translator, sentences)
    assert len({want[0], want[2], want[3]}) == 3 and want[1] == ""  # distinct answers: the check means something
    reply = client.post("/v1/translate", json={"text": sentences})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"translations": want, "model": "de-en"}

    greedy = client.post("/v1/translate", json={"model": "de-en", "text": sentences[:1], "beam": 1, "alpha": 0})
    assert greedy.json()["translations"] == expected(translator, sentences[:1], beam=1, alpha=0.0)

    assert main(["translate", "--checkpoint", str(runs["translation"]), "--threads", "1", SENTENCES[0]]) == 0
    assert capsys.readouterr().out == want[0] + "\n"


def test_n_best_and_attention(client, translator):
    sentences = [SENTENCES[4], " "]
    reply = client.post("/v1/translate", json={"text": sentences, "beam": 3, "n_best": 3, "attention": True})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["translations"] == [expected(translator, sentences[:1], beam=3)[0], ""]

    config = DecodeConfig(beam_size=3, alpha=0.6)
    ranked = translate_n_best(translator, translator.encode_source(sentences[:1]), config, 3)[0]
    alternatives = data["alternatives"][0]
    assert [a["text"] for a in alternatives] == [translator.tgt_vocab.decode(h.tokens) for h in ranked]
    assert [a["score"] for a in alternatives] == pytest.approx([h.score for h in ranked], abs=1e-4)
    assert alternatives[0]["text"] == data["translations"][0]
    assert data["alternatives"][1] == [{"text": "", "score": None}]

    shown, blank = data["attention"]
    assert blank is None
    ids = ranked[0].tokens
    maps = attention_maps(translator.model, translator.src_vocab, translator.tgt_vocab, sentences[0], ids)
    assert shown["src_tokens"] == maps.src_tokens and len(maps.src_tokens) == len(sentences[0]) + 1  # + <eos>
    assert shown["tgt_tokens"] == maps.tgt_tokens and len(maps.tgt_tokens) == len(ids) + 1  # <bos> + ...
    assert shown["output_tokens"] == maps.output_tokens
    S, T = len(maps.src_tokens), len(maps.tgt_tokens)
    for kind, shape in {"cross": (2, 4, T, S), "encoder": (2, 4, S, S), "decoder": (2, 4, T, T)}.items():
        got = torch.tensor(shown[kind])
        assert tuple(got.shape) == shape
        torch.testing.assert_close(got, torch.stack(maps.maps[kind]), atol=6e-5, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(shape[:-1]), atol=1e-3, rtol=0)


def test_attention_maps_are_those_of_explain_translation(translator, tmp_path, monkeypatch):
    import attnlab.inspect.plots as plots

    monkeypatch.setattr(plots, "plot_attention_maps", lambda *args, **kwargs: [])  # the maps, not the PNGs
    sentence = SENTENCES[2]
    ids = translator.translate_ids(translator.encode_source([sentence]), DecodeConfig(beam_size=2))[0][:6]
    found = attention_maps(translator.model, translator.src_vocab, translator.tgt_vocab, sentence, ids)
    written = explain_translation(translator.model, translator.src_vocab, translator.tgt_vocab, sentence,
                                  tmp_path, lambda s: ids)
    assert (found.src_tokens, found.tgt_tokens, found.output_tokens) == (
        written.src_tokens, written.tgt_tokens, written.output_tokens)
    for kind in ("encoder", "decoder", "cross"):
        for a, b in zip(found.maps[kind], written.maps[kind], strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="without <bos>/<eos>"):
        attention_maps(translator.model, translator.src_vocab, translator.tgt_vocab, sentence,
                       [*ids, translator.tgt_vocab.eos_id])


def test_generate_equals_generate(client, runs):
    loaded = load_models([str(runs["lm"])])[0].loaded
    body = {"model": "shakespeare", "prompt": "Ein Mann", "max_new_tokens": 30, "temperature": 0.9,
            "top_k": 10, "top_p": 0.95, "seed": 7}
    reply = client.post("/v1/generate", json=body)
    assert reply.status_code == 200, reply.text
    prompt = loaded.src_vocab.encode("Ein Mann")
    ids = generate(loaded.model, torch.tensor([prompt]), 30, temperature=0.9, top_k=10, top_p=0.95, seed=7)[0]
    want = loaded.src_vocab.decode(ids.tolist())
    assert reply.json() == {"text": want, "completion": loaded.src_vocab.decode(ids[len(prompt):].tolist()),
                            "seed": 7, "model": "shakespeare"}
    # Without a seed the server draws one and says which: sending it back repeats the text.
    free = client.post("/v1/generate", json={"prompt": "Ein", "max_new_tokens": 12}).json()
    again = client.post("/v1/generate", json={"prompt": "Ein", "max_new_tokens": 12, "seed": free["seed"]}).json()
    assert again["text"] == free["text"] and again["seed"] == free["seed"]


def test_the_event_loop_answers_while_a_model_decodes(server):
    """A long generation runs in the model's thread: /health answers while it is still running."""

    async def check():
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            before = (await c.get("/health")).json()["models"]["shakespeare"]["requests"]
            long = asyncio.create_task(c.post(GENERATE, json={"prompt": "Ein", "max_new_tokens": 1000, "seed": 1}))
            answered_during = 0
            for _ in range(2000):  # bounded: at most 2000 polls of /health
                health = await c.get("/health")
                if long.done():
                    break
                if health.json()["models"]["shakespeare"]["requests"] > before:  # taken by the worker
                    answered_during += 1
                await asyncio.sleep(0.01)
            reply = await long
            return answered_during, reply

    answered_during, reply = asyncio.run(asyncio.wait_for(check(), 120))
    assert reply.status_code == 200 and reply.json()["text"].startswith("Ein")
    assert answered_during >= 3  # /health answered again and again while the model generated


# -- errors ---------------------------------------------------------------------------------------

BAD = [  # (path, raw body, status, code, limit)
    (TRANSLATE, b'{"text": ["a"', 422, "invalid_json", None),
    (TRANSLATE, b"\xff\xfe{}", 422, "invalid_json", None),
    (TRANSLATE, b"[" * 50_000, 422, "invalid_json", None),
    (TRANSLATE, b'{"text": "Ein Mann."}', 422, "invalid_request", None),
    (TRANSLATE, b'{"text": ["a"], "beam": "4"}', 422, "invalid_request", None),
    (TRANSLATE, b'{"text": ["a"], "beam": 0}', 422, "invalid_request", None),
    (TRANSLATE, b'{"text": ["a"], "alpha": NaN}', 422, "invalid_request", None),
    (TRANSLATE, b'{"text": [1, 2]}', 422, "invalid_request", None),
    (TRANSLATE, b'{"text": []}', 422, "invalid_request", None),
    (TRANSLATE, b'{"text": ["a"], "attention": "yes"}', 422, "invalid_request", None),
    (TRANSLATE, b'{"text": ["a"], "surprise": 1}', 422, "invalid_request", None),
    (TRANSLATE, b'{"text": ["a"], "beam": 2, "n_best": 3}', 422, "invalid_request", None),
    (TRANSLATE, json.dumps({"text": [""] * 5000}).encode(), 413, "limit_exceeded", "max_sentences"),
    (TRANSLATE, json.dumps({"text": ["a" * 2001]}).encode(), 413, "limit_exceeded", "max_chars"),
    (TRANSLATE, json.dumps({"text": ["a" * 60]}).encode(), 413, "limit_exceeded", "max_tokens"),
    (TRANSLATE, json.dumps({"text": ["a"] * 9, "attention": True}).encode(), 413, "limit_exceeded",
     "max_attention_sentences"),
    (TRANSLATE, b'{"text": ["a"], "beam": 9}', 422, "limit_exceeded", "max_beam"),
    (TRANSLATE, b'{"text": ["a"], "beam": 100000000000000000000000}', 422, "limit_exceeded", "max_beam"),
    (TRANSLATE, b" " * (1 << 20) + b'{"text": ["a"]}', 413, "limit_exceeded", "max_body_bytes"),
    (TRANSLATE, b'{"text": ["a"], "model": "nope"}', 404, "unknown_model", None),
    (TRANSLATE, b'{"text": ["a"], "model": "shakespeare"}', 422, "wrong_model_kind", None),
    (GENERATE, b'{"prompt": "Ein", "model": "de-en"}', 422, "wrong_model_kind", None),
    (GENERATE, b'{"prompt": ""}', 422, "invalid_request", None),
    (GENERATE, b'{"prompt": "Ein", "temperature": 0}', 422, "invalid_request", None),
    (GENERATE, b'{"prompt": "Ein", "top_p": 1.5}', 422, "invalid_request", None),
    (GENERATE, b'{"prompt": "Ein", "seed": -1}', 422, "invalid_request", None),
    (GENERATE, b'{"prompt": "Ein", "max_new_tokens": 1001}', 422, "limit_exceeded", "max_new_tokens"),
    (GENERATE, b'{"prompt": "Ein 42"}', 422, "unknown_characters", None),
    (GENERATE, json.dumps({"prompt": "a" * 2001}).encode(), 413, "limit_exceeded", "max_chars"),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "limit"), BAD,
                         ids=[f"{i}-{c[3]}-{c[4] or ''}" for i, c in enumerate(BAD)])
def test_bad_requests_get_their_status_and_a_clear_json_error(client, path, body, status, code, limit):
    reply = client.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]
    if limit:
        assert error["limit"] == limit and error["got"] > error["max"]
        assert str(error["max"]) in error["message"]


def test_protocol_errors(client):
    plain = client.post(TRANSLATE, content=b'{"text": ["a"]}', headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert client.delete(TRANSLATE).json()["error"]["code"] == "method_not_allowed"
    # Without an API key, only loopback host names are answered (no DNS rebinding).
    assert client.get("/health", headers={"host": "attacker.example"}).status_code == 421
    assert client.get("/health", headers={"host": "localhost:8000"}).status_code == 200
    assert client.get("/health", headers={"host": "[::1]:8000"}).status_code == 200


def test_the_queue_is_bounded(runs):
    config = ServeConfig(port=0, batch_wait_ms=400, max_queued=1)

    async def two(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            first = asyncio.create_task(c.post(TRANSLATE, json={"text": ["Kinder."]}))
            await asyncio.sleep(0.15)  # the first waits 400 ms for company, in the queue
            second = await c.post(TRANSLATE, json={"text": ["Kinder."]})
            return await first, second

    with running(runs, config) as url:
        first, second = asyncio.run(asyncio.wait_for(two(url), 60))
    assert first.status_code == 200
    assert second.status_code == 503 and second.json()["error"]["limit"] == "max_queued"


# -- micro-batching ---------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_each_gets_its_own_answers(runs, translator):
    bodies = [{"text": SENTENCES[i % 8 : i % 8 + 1 + i % 3], "beam": 4 if i % 4 else 2} for i in range(12)]
    bodies[5]["text"] = [SENTENCES[6], "", SENTENCES[0]]
    config = ServeConfig(port=0, batch_wait_ms=300)
    with running(runs, config) as url:
        replies = asyncio.run(post_all(url, bodies))
        with httpx.Client(base_url=url) as c:
            counted = stats(c)
    for body, reply in zip(bodies, replies):
        assert reply.status_code == 200, reply.text
        # Decoding each request alone, as `attnlab translate` would, gives the same lines in the same order.
        assert reply.json()["translations"] == expected(translator, body["text"], beam=body["beam"])
    assert counted["requests"] == 12
    assert counted["largest_batch"] >= 4 and counted["batches"] < 12  # they were decoded together


def test_without_batching_each_request_is_decoded_alone(runs, translator):
    bodies = [{"text": [s]} for s in SENTENCES[:5]]
    with running(runs, ServeConfig(port=0, batching=False)) as url:
        replies = asyncio.run(post_all(url, bodies))
        with httpx.Client(base_url=url) as c:
            counted = stats(c)
            assert c.get("/v1/models").json()["batching"]["enabled"] is False
    assert [r.json()["translations"] for r in replies] == [expected(translator, b["text"]) for b in bodies]
    assert counted["largest_batch"] == 1 and counted["batches"] == 5


def test_a_failing_request_does_not_take_its_batch_down(runs, translator, monkeypatch):
    import attnlab.app.serve as serve

    real = serve.attention_maps

    def fragile(model, src_vocab, tgt_vocab, sentence, target_ids):
        if sentence == "kaputt":
            raise RuntimeError("this sentence breaks the model")
        return real(model, src_vocab, tgt_vocab, sentence, target_ids)

    monkeypatch.setattr(serve, "attention_maps", fragile)
    bodies = [{"text": [SENTENCES[0]], "attention": True}, {"text": ["kaputt"], "attention": True},
              {"text": [SENTENCES[1]], "attention": True}, {"text": [SENTENCES[2]]}]
    with running(runs, ServeConfig(port=0, batch_wait_ms=300)) as url:
        replies = asyncio.run(post_all(url, bodies))
        with httpx.Client(base_url=url) as c:
            counted = stats(c)
            assert c.get("/health").status_code == 200
    assert counted["largest_batch"] == 4  # all four were in one batch
    assert replies[1].status_code == 500
    assert replies[1].json()["error"] == {"code": "decoding_failed",
                                          "message": "decoding failed: RuntimeError: this sentence breaks the model"}
    for i in (0, 2, 3):
        assert replies[i].status_code == 200, replies[i].text
        assert replies[i].json()["translations"] == expected(translator, bodies[i]["text"])
    assert replies[0].json()["attention"][0]["src_tokens"][-1] == "<eos>"


def test_malformed_requests_amid_good_ones(server, translator):
    """A burst of bad bodies at the same time as good requests: each bad one gets its 4xx, every good
    one its translation, and the server stays healthy (the long version: benchmarks/bench_serve.py)."""
    url = server
    good = {"text": [SENTENCES[3]]}
    bad = [(body, status) for path, body, status, _, _ in BAD if path == TRANSLATE]

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            goods = [c.post(TRANSLATE, json=good) for _ in range(10)]
            bads = [c.post(TRANSLATE, content=body, headers={"content-type": "application/json"}) for body, _ in bad]
            return await asyncio.wait_for(asyncio.gather(*goods, *bads), 120)

    replies = asyncio.run(burst())
    want = expected(translator, good["text"])
    assert all(r.status_code == 200 and r.json()["translations"] == want for r in replies[:10])
    assert [r.status_code for r in replies[10:]] == [status for _, status in bad]
    assert httpx.get(url + "/health").json()["status"] == "ok"


# -- the API key rule -------------------------------------------------------------------------------


def test_binding_beyond_loopback_needs_a_key_or_no_auth(runs, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    check_bind(ServeConfig())
    check_bind(ServeConfig(host="0.0.0.0", api_key=KEY))
    check_bind(ServeConfig(host="0.0.0.0", no_auth=True))
    with pytest.raises(ValueError, match="give --api-key KEY .* or --no-auth"):
        check_bind(ServeConfig(host="0.0.0.0"))
    with pytest.raises(ValueError, match="not both"):
        check_bind(ServeConfig(api_key=KEY, no_auth=True))
    with pytest.raises(ValueError, match="at least 8 characters"):
        ServeConfig(api_key="short")
    # The command line refuses before loading anything (and never binds).
    code = main(["serve", "--checkpoint", str(runs["translation"]), "--host", "0.0.0.0", "--threads", "1"])
    assert code == 2
    assert "binding to 0.0.0.0 makes the service reachable from other machines" in capsys.readouterr().err


def test_the_api_key_is_checked_on_every_v1_request(runs):
    with running(runs, ServeConfig(port=0, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        for method, path in (("GET", "/v1/models"), ("POST", TRANSLATE), ("POST", GENERATE), ("GET", "/v1/x")):
            for headers in ({}, {"authorization": "Bearer wrong-key-123"}, {"x-api-key": KEY[:-1]}):
                reply = c.request(method, path, headers=headers, json={})
                assert reply.status_code == 401, (method, path, headers)
                assert reply.json()["error"]["code"] == "unauthorized"
                assert reply.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        ok = c.post(TRANSLATE, headers={"x-api-key": KEY}, json={"text": ["Kinder."]})
        assert ok.status_code == 200 and ok.json()["translations"]
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # no data: no key


# -- shutdown -----------------------------------------------------------------------------------------


def start_server_process(runs, *flags: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("ATTNLAB_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnlab", "serve", "--checkpoint", f"de-en={runs['translation']}", "--port", "0",
         "--threads", "1", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT (...)", once it listens
    found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    if not found:
        proc.kill()
        pytest.fail(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, found.group(1)


def test_sigterm_and_sigint_stop_the_server_after_the_requests_in_flight(runs, translator):
    """Two servers (started together, to share the start-up time): each gets a request that waits
    in its queue, then a signal; the request is answered, and the process exits 0."""
    procs = [start_server_process(runs, "--batch-wait-ms", "1000") for _ in range(2)]
    try:
        for (proc, url), stop in zip(procs, (signal.SIGTERM, signal.SIGINT)):
            replies: list[httpx.Response] = []
            sender = threading.Thread(target=lambda url=url: replies.append(
                httpx.post(url + TRANSLATE, json={"text": [SENTENCES[1]]}, timeout=60)))
            with httpx.Client(base_url=url, timeout=60) as c:
                sender.start()
                deadline = time.monotonic() + 20
                while stats(c)["queued"] == 0:  # in flight: queued, waiting a second for company
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            proc.send_signal(stop)
            sender.join(60)
            assert proc.wait(timeout=60) == 0, stop
            assert replies and replies[0].status_code == 200, stop
            assert replies[0].json()["translations"] == expected(translator, [SENTENCES[1]])
            assert "finished the requests in flight" in proc.stderr.read()
            with pytest.raises(httpx.ConnectError):
                httpx.get(url + "/health", timeout=5)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.slow
def test_the_load_and_fuzz_benchmark_runs_clean(tmp_path):
    """benchmarks/bench_serve.py, briefly, on a tiny random model: no errors, every translation equal
    to `attnlab translate`'s, every malformed request its 4xx, and a clean exit on SIGTERM."""
    from serving import CHARS

    from attnlab.data.vocab import CharVocab, vocabs_to_dict
    from attnlab.store.checkpoint import save_checkpoint

    vocab = CharVocab.build(CHARS)  # positions for the test sentences (characters, here) and their translations
    model = tiny_transformer(4, vocab=len(vocab), max_len=256)
    config = {"kind": "translation", "model": model.config.to_dict(),
              "train": {"task": {"src_lang": "de", "tgt_lang": "en"}}}
    checkpoint = save_checkpoint(tmp_path / "long", model, config, vocabs_to_dict(vocab, vocab))
    flags = ["--checkpoint", str(checkpoint), "--clients", "1", "--clients", "8", "--seconds", "4",
             "--requests", "60", "--sentences", "40", "--fuzz", "--log-dir", str(tmp_path)]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), *flags],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr[-3000:]
    runs_reported = re.findall(r"errors (\d+)  different from `attnlab translate` (\d+)", result.stdout)
    assert len(runs_reported) == 5 and all(r == ("0", "0") for r in runs_reported), result.stdout
    fuzzed = re.search(r"fuzzer: (\d+) malformed requests \(\d+ kinds\), (\d+) got the expected 4xx, 0 did not",
                       result.stdout)
    assert fuzzed and fuzzed.group(1) == fuzzed.group(2) and int(fuzzed.group(1)) > 0, result.stdout
    assert "/health at the end: 200 ok" in result.stdout
    assert result.stdout.count("SIGTERM: the server exited with status 0") == 2


def test_int8_serving_answers_what_the_int8_translator_answers(runs):
    """--int8: translation decodes on int8 weights, quantized once at start; the language model stays float32."""
    int8 = load_translator(runs["translation"], int8=True)
    sentences = SENTENCES[:4]
    with running(runs, ServeConfig(port=0), int8=True) as url, httpx.Client(base_url=url, timeout=60) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["de-en"]["int8"] is True and "int8" not in models["shakespeare"]
        reply = c.post(TRANSLATE, json={"text": sentences, "beam": 1})
        assert reply.status_code == 200, reply.text
        assert reply.json()["translations"] == int8.translate(sentences, DecodeConfig(beam_size=1))
