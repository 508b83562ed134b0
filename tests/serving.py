"""Shared by the tests of `attnlab serve` (test_serve.py, test_serve_page.py): tiny saved models and
a server running in a thread of the test process, on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import uvicorn
from helpers import tiny_language_model, tiny_transformer

from attnlab.app.serve import ServeConfig, bind_socket, create_app, load_models
from attnlab.data.vocab import CharVocab, vocabs_to_dict
from attnlab.decode.translate import DecodeConfig, Translator
from attnlab.store.checkpoint import save_checkpoint, write_json_atomic

CHARS = "abcdefghijklmnopqrstuvwxyzäöüßABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?"
SENTENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Kinder.", "Eine Frau liest.",
             "Ein Hund rennt durch den Park.", "Ein Mädchen singt.", "Die Sonne scheint.", "Wir essen Brot."]


def make_runs(root: Path) -> dict[str, Path]:
    """A translation run (a run directory with its summary.json) and a language-model checkpoint,
    both with random weights and one character vocabulary."""
    vocab = CharVocab.build(CHARS)
    model = tiny_transformer(3, vocab=len(vocab), max_len=40)
    config = {"kind": "translation", "model": model.config.to_dict(),
              "train": {"task": {"src_lang": "de", "tgt_lang": "en"}}}
    run = root / "de-en"
    save_checkpoint(run / "ckpt" / "step-0000001", model, config, vocabs_to_dict(vocab, vocab))
    write_json_atomic(run / "checkpoints.json", {"last": "ckpt/step-0000001", "model": "ckpt/step-0000001"})
    write_json_atomic(run / "summary.json", {"steps": 1, "val_bleu": 0.5})
    lm = tiny_language_model(1, vocab=len(vocab))
    lm_dir = save_checkpoint(root / "lm-ckpt", lm, {"kind": "lm", "model": lm.config.to_dict(), "train": {}},
                             vocabs_to_dict(vocab, vocab))
    return {"translation": run, "lm": lm_dir}


@contextlib.contextmanager
def running(runs: dict[str, Path], config: ServeConfig = ServeConfig(port=0), int8: bool = False):
    """Serve both models (as "de-en" and "shakespeare") from a thread; yields the base URL."""
    app = create_app(load_models([f"de-en={runs['translation']}", f"shakespeare={runs['lm']}"], int8=int8), config)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def expected(translator: Translator, sentences: list[str], beam: int = 4, alpha: float = 0.6) -> list[str]:
    """What `attnlab translate` gives for ``sentences``, decoded together, in their order."""
    return translator.translate(sentences, DecodeConfig(beam_size=beam, alpha=alpha))
