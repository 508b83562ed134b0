"""Faults injected through the real command line and API: for each, no traceback, one line that
names the problem (the file, field or flag), nothing outside the run touched, and the work since
the last step or checkpoint recoverable. README, "What attnlab promises when things go wrong",
lists the same faults."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    cli_flags,
    quiet,
    small_config,
    subprocess_env,
    tiny_language_model,
    tiny_transformer,
)
from safetensors.torch import load_file, save_file

import attnlab.store.checkpoint as checkpoint_module
from attnlab.app.cli import main
from attnlab.app.demo import MARKER, _clear_previous_demo
from attnlab.data.vocab import CharVocab, vocabs_to_dict
from attnlab.errors import AttnlabError, RunDirectoryError
from attnlab.store.checkpoint import (
    read_checkpoint_json,
    resolve_checkpoint,
    save_checkpoint,
)
from attnlab.store.runlock import RunLock
from attnlab.train.trainer import resume, train

pytestmark = pytest.mark.filterwarnings("ignore:.*were cut; their translations cover the start only")


def cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *fragments: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def last_step(run: Path) -> int:
    return read_checkpoint_json(resolve_checkpoint(run, "last"), "trainer.json")["step"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- a translation checkpoint and a language-model checkpoint to damage ------------------------
CHARS = sorted(set("ein Mann fährt Rad. a man rides a bike."))


@pytest.fixture
def translation_checkpoint(tmp_path) -> Path:
    vocab = CharVocab(CHARS)
    model = tiny_transformer(vocab=len(vocab), share_embeddings=True)
    config = {"kind": "translation", "model": model.config.to_dict(), "train": {}}
    return save_checkpoint(tmp_path / "ckpt", model, config, vocabs_to_dict(vocab, vocab))


@pytest.fixture
def lm_checkpoint(tmp_path) -> Path:
    vocab = CharVocab(sorted(set("ROMEO: Juliet\n")))
    model = tiny_language_model(vocab=len(vocab))
    config = {"kind": "lm", "model": model.config.to_dict(), "train": {}}
    return save_checkpoint(tmp_path / "lm", model, config, vocabs_to_dict(vocab, vocab))


def rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


# -- 1. the demo never deletes what it did not make --------------------------------------------
def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    code, _, err = cli(["demo", "--out", precious, "--minutes", "0.01"], capsys)
    assert code == 2
    assert_one_line(err, f"--out {precious} already holds files that are not an attnlab demo run")
    assert (precious / "thesis.txt").read_text() == "years of work"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    code, _, err = cli(["demo", "--out", a_file, "--minutes", "0.01"], capsys)
    assert code == 2 and "is a file, not a folder" in err and a_file.read_text() == "keep"


def test_demo_replaces_only_its_own_earlier_run(tmp_path):
    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / MARKER).write_text("made by attnlab demo")
    (earlier / "train.jsonl").write_text("{}\n")
    _clear_previous_demo(earlier)
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER]
    with RunLock(earlier):  # a demo run that is still training is never removed
        (earlier / "train.jsonl").write_text("{}\n")
        with pytest.raises(RunDirectoryError, match="is being written by pid"):
            _clear_previous_demo(earlier)
    assert (earlier / "train.jsonl").exists()


# -- 2. paths read from a run's files stay inside the run --------------------------------------
def test_a_pointer_outside_the_run_is_refused_on_load(tmp_path, translation_checkpoint, capsys):
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "checkpoints.json").write_text(json.dumps({"history": [], "model": "../ckpt"}))
    code, _, err = cli(["translate", "--checkpoint", run, "Ein Mann."], capsys)
    assert code == 2
    assert_one_line(err, "checkpoints.json", "'../ckpt' is outside the run's ckpt/ folder")
    (run / "checkpoints.json").write_text("[1, 2]")
    code, _, err = cli(["translate", "--checkpoint", run, "Ein Mann."], capsys)
    assert code == 2
    assert_one_line(err, "checkpoints.json: expected an object")


# -- 3. one writer per run --------------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_first_ones_name(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):
        code, _, err = cli(["train", "--preset", "tiny", "--out", run, *cli_flags(small_config(max_steps=1))], capsys)
    assert code == 2
    assert_one_line(err, f"{run} is being written by pid {os.getpid()}")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else was written


def test_the_lock_of_a_killed_process_does_not_block_the_run(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from attnlab.store.runlock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(run)],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=f"pid {holder.pid}"):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    summary = train(small_config(max_steps=1, eval_every=1), run, progress=False, echo=quiet)
    assert summary["steps"] == 1  # the dead process's lock file is still there, its lock is not


# -- 4. interrupts and failed saves --------------------------------------------------------------
@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_run_saves_and_resumes_to_the_same_weights(tmp_path, signal_number, exit_code):
    """SIGTERM/SIGINT mid-epoch, between evaluations: the run finishes its step, writes ckpt/latest,
    says how to resume and exits 128 + N; resumed, it ends bit-equal to a run never interrupted."""
    steps = 14
    config = small_config(max_steps=steps, eval_every=10, save_every=3)
    train(config, tmp_path / "a", progress=False, echo=quiet)

    run = tmp_path / "b"
    process = subprocess.Popen(
        [sys.executable, "-m", "attnlab", "train", "--preset", "tiny", "--out", str(run), "--no-progress",
         *cli_flags(config)],
        cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:  # wait for the first checkpoint
        if (run / "ckpt" / "latest").exists():
            break
        time.sleep(0.02)
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=120)
    assert process.returncode == exit_code, out + err
    assert "Traceback" not in err and f"attnlab train --out {run} --resume" in err
    stopped = last_step(run)
    assert resolve_checkpoint(run, "last").name == "latest" or stopped % 10 == 0
    assert 3 <= stopped < steps

    resume(run, progress=False, echo=quiet)
    a, b = (load_file(str(resolve_checkpoint(r, "last") / "model.safetensors")) for r in (tmp_path / "a", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if r["event"] == "eval"]
    assert evals == sorted(set(evals)) == [10, 14]


def test_save_every_writes_a_resumable_checkpoint_between_evaluations(tmp_path):
    run = tmp_path / "run"
    train(small_config(max_steps=5, eval_every=0, save_every=2, epochs=1), run, progress=False, echo=quiet)
    # one epoch is 18 steps: no evaluation before max_steps=5, which evaluates; step 4 saved ckpt/latest
    rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in rows if r["event"] in ("save", "eval")] == [
        ("save", 2), ("save", 4), ("eval", 5)]
    assert not (run / "ckpt" / "latest").exists()  # superseded by the evaluated checkpoint at step 5
    assert last_step(run) == 5


def test_a_failed_save_loses_no_checkpoint_and_resume_does_not_repeat_log_rows(tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = small_config(max_steps=4, eval_every=2)
    train(config.override(max_steps=2), run, progress=False, echo=quiet)
    real_save = checkpoint_module.save_file

    def disk_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        resume(run, max_steps=4, progress=False, echo=quiet)
    assert last_step(run) == 2  # the last good checkpoint is intact
    assert not [p for p in (run / "ckpt").iterdir() if p.name.startswith(".")]  # no temporary folder left
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)

    resume(run, max_steps=4, progress=False, echo=quiet)
    steps = [json.loads(line)["step"] for line in (run / "train.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "eval"]
    assert steps == [2, 4]  # the row of the failed save at step 4 was not kept twice


def test_a_full_disk_ends_training_with_one_line(tmp_path, monkeypatch, capsys):
    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    run = tmp_path / "run"
    code, _, err = cli(["train", "--preset", "tiny", "--out", run, "--no-progress",
                        *cli_flags(small_config(max_steps=1, eval_every=1))], capsys)
    assert code == 2
    assert_one_line(err, "No space left on device", "model.safetensors")


def test_orphans_of_a_killed_save_are_cleaned_on_resume(tmp_path):
    run = tmp_path / "run"
    train(small_config(max_steps=2, eval_every=2), run, progress=False, echo=quiet)
    orphan = run / "ckpt" / ".step-0000004.abc123.tmp"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"partial")
    (run / ".checkpoints.json.xyz.tmp").write_text("{")
    resume(run, max_steps=3, progress=False, echo=quiet)
    assert not orphan.exists() and not (run / ".checkpoints.json.xyz.tmp").exists()


# -- 6. a run with nothing to train on ----------------------------------------------------------
def test_a_run_that_filters_out_every_pair_is_an_error(tmp_path, capsys):
    code, _, err = cli(["train", "--preset", "tiny", "--out", tmp_path / "run",
                        *cli_flags(small_config(max_steps=1)), "--max-len", "3"], capsys)
    assert code == 2
    assert_one_line(err, "no training pair fits max_len=3", "raise --max-len")
    assert not (tmp_path / "run" / "checkpoints.json").exists()


def test_dropped_pairs_are_reported(tmp_path):
    said = []
    train(small_config(max_steps=1, eval_every=1, max_len=40), tmp_path / "run", progress=False, echo=said.append)
    assert any("longer than max_len=40 left out" in line for line in said)


# -- 8 and 12. bad flags and settings: one line, exit 2 -----------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "tiny", "--lr", "-0.1"], "setting lr must be > 0"),
    (["train", "--preset", "tiny", "--eval-sentences", "-5"], "eval_sentences must be >= 0"),
    (["train", "--preset", "tiny", "--num-encoder-layers", "-2"], "num_encoder_layers must be >= 1"),
    (["train", "--preset", "tiny", "--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["train", "--preset", "tiny", "--patience", "-1"], "patience must be >= 0"),
    (["train", "--preset", "tiny", "--time-limit", "-1"], "time_limit must be >= 0"),
    (["train", "--preset", "tiny", "--eval-every", "-1"], "eval_every must be >= 0"),
    (["train", "--preset", "tiny", "--dropout", "1.5"], "dropout must be in [0, 1)"),
    (["train", "--preset", "tiny", "--lr", "nan"], "lr must be a finite number"),
    (["train", "--preset", "tiny", "--seed", str(2**70)], "seed must be in [0, 2**63)"),
    (["train", "--preset", "tiny", "--device", "bogus"], "device must be one of"),
    (["train", "--preset", "tiny", "--threads", "-1"], "threads must be >= 0"),
])
def test_bad_training_settings_give_one_line(tmp_path, capsys, argv, message):
    code, _, err = cli([*argv, "--out", tmp_path / "run"], capsys)
    assert code == 2
    assert_one_line(err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["translate", "--alpha", "nan", "Ein Mann."], "alpha (the length penalty) must be a finite number"),
    (["translate", "--alpha", "inf", "Ein Mann."], "alpha (the length penalty) must be a finite number"),
    (["translate", "--beam", "0", "Ein Mann."], "beam_size must be >= 1"),
    (["translate", "--threads", "-1", "Ein Mann."], "--threads must be from 0"),
    (["translate", "--threads", "100000", "Ein Mann."], "--threads must be from 0"),  # PyTorch crashed on it
    (["translate", "--device", "bogus", "Ein Mann."], "--device 'bogus'"),
    (["evaluate", "--limit", "-3"], "limit must be >= 0"),
])
def test_bad_decoding_flags_give_one_line(translation_checkpoint, capsys, argv, message):
    code, _, err = cli([argv[0], "--checkpoint", translation_checkpoint, *argv[1:]], capsys)
    assert code == 2
    assert_one_line(err, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_gives_one_line(translation_checkpoint, capsys):
    code, _, err = cli(["translate", "--checkpoint", translation_checkpoint, "--device", "cuda", "x"], capsys)
    assert code == 2
    assert_one_line(err, "--device cuda: PyTorch sees no CUDA GPU")


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "-5"], "max_new_tokens must be a whole number >= 1"),
    (["--temperature", "nan"], "temperature must be a finite number > 0"),
    (["--seed", str(2**70)], "seed must be in [0, 2**63)"),
    (["--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--prompt", ""], "the prompt is empty"),
])
def test_bad_generation_flags_give_one_line(lm_checkpoint, capsys, argv, message):
    code, _, err = cli(["generate", "--checkpoint", lm_checkpoint, "--max-new-tokens", "3", *argv], capsys)
    assert code == 2
    assert_one_line(err, message)


# -- 9. prompt characters the model does not know are named ------------------------------------
def test_unknown_prompt_characters_are_named_in_a_warning(lm_checkpoint, capsys):
    code, out, err = cli(["generate", "--checkpoint", lm_checkpoint, "--prompt", "ROMEO: zß", "--max-new-tokens",
                          "4", "--seed", "1"], capsys)
    assert code == 0
    assert "the prompt's characters 'zß' are not in the model's vocabulary" in err
    assert err.count("\n") == 1 and out.startswith("ROMEO: ")


# -- 10 and 12. checkpoint contents are checked, not trusted ------------------------------------
def _int64_weights(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v.long() for k, v in tensors.items()}, str(ckpt / "model.safetensors"))


def _nan_weight(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0] = math.nan
    save_file(tensors, str(ckpt / "model.safetensors"))


def _wrong_shape(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in sorted(tensors) if k.endswith("norm1.weight"))
    tensors[name] = torch.ones(3)
    save_file(tensors, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("damage, fragments", [
    (lambda c: (c / "model.safetensors").write_bytes(b""), ["model.safetensors: not a readable safetensors file"]),
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:200]),
     ["model.safetensors: not a readable safetensors file"]),
    (_int64_weights, ["model.safetensors: tensor", "is torch.int64, the model's is torch.float32"]),
    (_nan_weight, ["model.safetensors: tensor", "holds NaN or infinite values"]),
    (_wrong_shape, ["model.safetensors: tensor", "has shape (3,)"]),
    (lambda c: (c / "config.json").write_text("[1, 2]"), ["config.json: 'kind' must be one of"]),
    (lambda c: (c / "config.json").write_text("{not json"), ["config.json: not valid JSON"]),
    (lambda c: rewrite_json(c / "config.json", lambda d: {**d, "model": {**d["model"], "norm_first": "false"}}),
     ["config.json: model: field 'norm_first' must be bool, got 'false'"]),
    (lambda c: rewrite_json(c / "config.json", lambda d: {**d, "model": {**d["model"], "d_model": 16.5}}),
     ["config.json: model: field 'd_model' must be int"]),
    (lambda c: rewrite_json(c / "config.json", lambda d: {**d, "model": {**d["model"], "pad_id": 9999}}),
     ["config.json: model: pad_id 9999 is outside the vocabulary"]),
    (lambda c: (c / "vocab.json").write_text("{}"), ["vocab.json: expected an object with a 'src' vocabulary"]),
    (lambda c: rewrite_json(c / "vocab.json", lambda d: {"src": {**d["src"], "chars": d["src"]["chars"][:5]}}),
     ["vocab.json has 9 tokens but config.json's src_vocab_size is"]),
    (lambda c: (c / "vocab.json").unlink(), ["is not a complete attnlab checkpoint: vocab.json is missing"]),
])
def test_a_damaged_checkpoint_gives_one_line_naming_the_file(translation_checkpoint, capsys, damage, fragments):
    damage(translation_checkpoint)
    code, _, err = cli(["translate", "--checkpoint", translation_checkpoint, "ein Mann"], capsys)
    assert code == 2
    assert_one_line(err, *fragments)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(translation_checkpoint, capsys, monkeypatch):
    from attnlab.decode import translate

    def broken(*args, **kwargs):
        raise RuntimeError("something deep inside\nwith two lines")

    monkeypatch.setattr(translate.Translator, "translate", broken)
    code, _, err = cli(["translate", "--checkpoint", translation_checkpoint, "x"], capsys)
    assert code == 1
    assert_one_line(err, "internal error: RuntimeError: something deep inside with two lines", "--debug")
    with pytest.raises(RuntimeError, match="something deep inside"):
        main(["--debug", "translate", "--checkpoint", str(translation_checkpoint), "x"])


# -- 12. --out that cannot be written is found before any work --------------------------------
def test_a_file_as_out_is_refused_before_the_vocabulary_is_built(tmp_path, capsys, monkeypatch):
    from attnlab.data.vocab import Vocab

    monkeypatch.setattr(Vocab, "train", lambda *a, **k: pytest.fail("work started before --out was checked"))
    out = tmp_path / "out.txt"
    out.write_text("a file")
    code, _, err = cli(["train", "--preset", "tiny", "--out", out, *cli_flags(small_config(max_steps=1))], capsys)
    assert code == 2
    assert_one_line(err, f"cannot write to --out {out}")
    assert out.read_text() == "a file"


def test_non_utf8_standard_input_names_the_line(translation_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "attnlab", "translate", "--checkpoint", str(translation_checkpoint), "--threads", "1"],
        input=b"ein Mann\n\xff\xfe kaputt\n", env=subprocess_env(), capture_output=True, timeout=120,
    )
    err = result.stderr.decode()
    assert result.returncode == 2
    assert_one_line(err, "standard input, line 2: invalid UTF-8 (byte 0xff")


# -- 13. files of a run follow the user's umask ------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        train(small_config(max_steps=1, eval_every=1), run, progress=False, echo=quiet)
    finally:
        os.umask(old)
    for path in [run, *run.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == expected, f"{path.relative_to(tmp_path)}: {oct(mode)} != {oct(expected)}"


def test_every_error_derives_from_one_base_class():
    from attnlab.data.corpus import CorpusError
    from attnlab.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        TrainingInterrupted,
    )

    for error in (CorpusError, CheckpointError, ConfigError, DataError, RunDirectoryError, TrainingInterrupted):
        assert issubclass(error, AttnlabError)
