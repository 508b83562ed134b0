"""`attnlab serve` under load, with micro-batching on and off, and under a fuzzing attack.

1. Starts `attnlab serve` on 127.0.0.1 (a free port) in a process of its own, and drives it with N
   concurrent clients (httpx, asynchronous; N = 1, 8, 32, 64 by default), each sending one
   test_2016_flickr sentence per request, again and again, for at most --seconds seconds and
   --requests requests per run. Reports sentences/s, p50/p95/p99 latency, errors, and whether every
   response equals what `attnlab translate` prints for its sentence (the same Translator call,
   made here in advance). The same runs follow with batching off (`--no-batching`); the goal is
   at least 3x the sentences/s with batching at 32 clients.
2. With --fuzz: while 8 clients keep translating, a fuzzer sends malformed requests (bad JSON,
   wrong types, bodies over the limit, streamed without a length, not UTF-8, nested 100,000 deep,
   thousands of empty strings ...). Every bad request must get its 4xx, every good one its right
   translation; the server's memory (RSS, read from /proc) must stay bounded, and /health must
   answer at the end.

Usage (after training, see README "Serving"):
    python benchmarks/bench_serve.py --checkpoint runs/de-en --threads 1 --fuzz
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from attnlab.app.process import set_process_defaults  # no torch inside

set_process_defaults()  # as the attnlab command sets them, before torch loads

import httpx  # noqa: E402
import torch  # noqa: E402

from attnlab.data.corpus import load_multi30k  # noqa: E402
from attnlab.decode.load import load_checkpoint  # noqa: E402
from attnlab.decode.translate import DecodeConfig, load_translator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRANSLATE = "/v1/translate"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`attnlab serve` in its own process, on 127.0.0.1 and a port the system picks."""

    def __init__(self, checkpoint: str, threads: int, flags: list[str], log: Path) -> None:
        self.log = open(log, "w", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        env.pop("ATTNLAB_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attnlab", "serve", "--checkpoint", checkpoint, "--port", "0",
             "--threads", str(threads), *flags],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(180)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line[0] if line else "")
        if not found:
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line} (see {log})")
        self.url = found.group(1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def load(url: str, clients: int, sentences: list[str], reference: list[str], beam: int, seconds: float,
               requests: int, stop: asyncio.Event | None = None) -> dict:
    """N clients, each sending one sentence per request until the time or the request budget is spent."""
    counter = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []
    wrong = 0
    deadline = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal wrong
        while time.perf_counter() < deadline and not (stop and stop.is_set()):
            n = next(counter)
            if n >= requests:
                return
            i = n % len(sentences)
            started = time.perf_counter()
            try:
                reply = await c.post(TRANSLATE, json={"text": [sentences[i]], "beam": beam})
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - started)
            if reply.status_code != 200:
                errors.append(f"{reply.status_code}: {reply.text[:200]}")
            elif reply.json()["translations"] != [reference[i]]:
                wrong += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await c.post(TRANSLATE, json={"text": [sentences[0]], "beam": beam})  # warm-up, not counted
        before = await batch_counts(c)
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[client(c) for _ in range(clients)]), seconds + 300)
        elapsed = time.perf_counter() - started
        after = await batch_counts(c)
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "done": len(latencies), "seconds": elapsed, "rate": len(latencies) / elapsed,
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
            "errors": errors, "wrong": wrong,
            "per_batch": (after["sentences"] - before["sentences"]) / batches if batches else float("nan")}


async def batch_counts(c: httpx.AsyncClient) -> dict:
    """The server's counts of batches and sentences so far (of its one model)."""
    (counts,) = (await c.get("/health")).json()["models"].values()
    return counts


def report(mode: str, r: dict) -> None:
    print(f"  {mode:12s} {r['clients']:3d} clients  {r['done']:5d} sentences in {r['seconds']:5.1f} s  "
          f"{r['rate']:7.2f} sentences/s  p50 {1000 * r['p50']:7.0f} ms  p95 {1000 * r['p95']:7.0f} ms  "
          f"p99 {1000 * r['p99']:7.0f} ms  {r['per_batch']:5.1f} sentences/batch  errors {len(r['errors'])}  "
          f"different from `attnlab translate` {r['wrong']}  (load average {load_average()})", flush=True)
    for error in r["errors"][:3]:
        print(f"      {error}")


# -- fuzzing --------------------------------------------------------------------------------------


def _streamed(total: int, chunk: int = 64 * 1024):
    """A body sent in chunks with no Content-Length: the limit must hold while it streams."""
    async def body():
        sent = 0
        while sent < total:
            yield b" " * min(chunk, total - sent)
            sent += chunk
    return body


FUZZ: list[tuple[str, object, dict, set[int]]] = [  # name, body, headers, accepted statuses
    ("malformed JSON", b'{"text": ["Ein Mann."', {}, {422}),
    ("JSON of the wrong shape", b'["Ein Mann."]', {}, {422}),
    ("text as a string", b'{"text": "Ein Mann."}', {}, {422}),
    ("beam as a string", b'{"text": ["a"], "beam": "4"}', {}, {422}),
    ("numbers as text", b'{"text": [1, 2, 3]}', {}, {422}),
    ("NaN alpha", b'{"text": ["a"], "alpha": NaN}', {}, {422}),
    ("a huge integer beam", b'{"text": ["a"], "beam": 1' + b"0" * 4000 + b"}", {}, {422}),
    ("not UTF-8", b'{"text": ["\xff\xfe\xfd"]}', {}, {422}),
    ("UTF-16", '{"text": ["Ein Mann."]}'.encode("utf-16"), {}, {422}),
    ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, {}, {413, 422}),
    ("nested in a field", b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", {}, {422}),
    ("5,000 empty strings", json.dumps({"text": [""] * 5000}).encode(), {}, {413}),
    ("one 900 kB sentence", json.dumps({"text": ["Hund " * 180_000]}).encode(), {}, {413}),
    ("a 4 MB body", b" " * (4 << 20), {}, {413}),
    ("4 MB streamed, no length", _streamed(4 << 20), {}, {413}),
    ("beam over the limit", b'{"text": ["Ein Mann."], "beam": 64}', {}, {422}),
    ("an unknown model", b'{"text": ["Ein Mann."], "model": "../../etc/passwd"}', {}, {404}),
    ("no content type", b'{"text": ["Ein Mann."]}', {"content-type": ""}, {415}),
    ("form-encoded", b"text=Ein+Mann", {"content-type": "application/x-www-form-urlencoded"}, {415}),
    ("unknown fields", b'{"text": ["a"], "__proto__": {"x": 1}}', {}, {422}),
    ("null text", b'{"text": null}', {}, {422}),
    ("empty body", b"", {}, {422}),
]


async def fuzz(url: str, seconds: float, max_requests: int) -> dict:
    """Send every malformed case in turn until the time or the request budget is spent."""
    counts = {"sent": 0, "as_expected": 0}
    unexpected: list[str] = []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        for name, body, headers, accepted in itertools.cycle(FUZZ):
            if time.perf_counter() >= deadline or counts["sent"] >= max_requests:
                break
            content = body() if callable(body) else body
            try:
                reply = await c.post(TRANSLATE, content=content, headers={"content-type": "application/json", **headers})
                status = reply.status_code
            except httpx.HTTPError as e:  # the server may close a connection it refused a body on
                status, reply = -1, None
                unexpected.append(f"{name}: {type(e).__name__}")
            counts["sent"] += 1
            if status in accepted:
                counts["as_expected"] += 1
            elif reply is not None:
                unexpected.append(f"{name}: {status} {reply.text[:120]}")
    return {**counts, "unexpected": unexpected}


async def fuzz_under_load(url: str, pid: int, sentences: list[str], reference: list[str], beam: int,
                          seconds: float, requests: int) -> None:
    memory: list[float] = [rss_mib(pid)]
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            memory.append(rss_mib(pid))
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    good, bad = await asyncio.gather(load(url, 8, sentences, reference, beam, seconds, requests),
                                     fuzz(url, seconds, 100_000))
    done.set()
    await watcher
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        health = await c.get("/health")
    report("under fuzzing", good)
    print(f"  fuzzer: {bad['sent']} malformed requests ({len(FUZZ)} kinds), {bad['as_expected']} got the "
          f"expected 4xx, {len(bad['unexpected'])} did not")
    for line in sorted(set(bad["unexpected"]))[:10]:
        print(f"      {line}")
    print(f"  server memory (RSS): {memory[0]:.0f} MiB before, {max(memory):.0f} MiB at most, {memory[-1]:.0f} MiB "
          f"after; /health at the end: {health.status_code} {health.json().get('status')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/de-en", help="translation run or checkpoint")
    parser.add_argument("--clients", type=int, action="append", help="concurrent clients (repeatable; "
                        "default 1, 8, 32, 64)")
    parser.add_argument("--seconds", type=float, default=20.0, help="longest run per setting (default 20)")
    parser.add_argument("--requests", type=int, default=2000, help="most requests per run (default 2000)")
    parser.add_argument("--sentences", type=int, default=1000, help="test sentences used (default all 1000)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="the server's and the reference's threads")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="passed to the server")
    parser.add_argument("--skip-unbatched", action="store_true", help="only the server with batching")
    parser.add_argument("--fuzz", action="store_true", help="also fuzz the API while 8 clients translate")
    parser.add_argument("--log-dir", default=None, help="where the servers' logs go (default: the run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    clients = args.clients or [1, 8, 32, 64]

    src_lang, tgt_lang = load_checkpoint(args.checkpoint, "translation").languages
    sentences = [s for s, _ in load_multi30k("test_2016_flickr", src_lang, tgt_lang)[: args.sentences]]
    print(f"{args.checkpoint}: {len(sentences)} test_2016_flickr sentences {src_lang}->{tgt_lang}, beam {args.beam}, "
          f"server and reference on {args.threads} thread(s); torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    with torch.inference_mode():  # what `attnlab translate` prints for each sentence
        reference = load_translator(args.checkpoint).translate(sentences, DecodeConfig(beam_size=args.beam))
    print(f"  reference translations: {time.perf_counter() - started:.1f} s (load average {load_average()})")

    log_dir = Path(args.log_dir or (args.checkpoint if Path(args.checkpoint).is_dir() else "."))
    modes = [("batching on", [])] + ([] if args.skip_unbatched else [("batching off", ["--no-batching"])])
    rates: dict[str, dict[int, float]] = {}
    for mode, flags in modes:
        extra = flags + (["--batch-wait-ms", str(args.batch_wait_ms)] if args.batch_wait_ms is not None else [])
        server = Server(args.checkpoint, args.threads, extra, log_dir / f"bench_serve.{mode.split()[1]}.log")
        print(f"server ({mode}) at {server.url}, pid {server.proc.pid}", flush=True)
        try:
            for n in clients:
                result = asyncio.run(load(server.url, n, sentences, reference, args.beam, args.seconds, args.requests))
                rates.setdefault(mode, {})[n] = result["rate"]
                report(mode, result)
            if args.fuzz and mode == "batching on":
                asyncio.run(fuzz_under_load(server.url, server.proc.pid, sentences, reference, args.beam,
                                            args.seconds, args.requests))
        finally:
            code = server.stop()
        print(f"  SIGTERM: the server exited with status {code}", flush=True)
    if "batching off" in rates:
        for n in clients:
            print(f"batching speed-up at {n:2d} clients: {rates['batching on'][n] / rates['batching off'][n]:.2f}x"
                  + ("  (goal >= 3x)" if n == 32 else ""))


if __name__ == "__main__":
    main()
