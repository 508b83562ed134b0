"""The training loop on the real Multi30k with a tiny model: schedule, batches, exact resume after a
SIGKILL, data-parallel steps equal to one process's step, stopping rules, and the run directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import cli_flags, quiet, small_config, subprocess_env
from safetensors.torch import load_file

from attnlab.errors import AttnlabError
from attnlab.store.checkpoint import read_checkpoint_json, resolve_checkpoint
from attnlab.train.config import TrainConfig
from attnlab.train.optim import build_adam, cosine_lr, noam_lr
from attnlab.train.tasks import TranslationTask, build_task
from attnlab.train.trainer import (
    World,
    learning_rate,
    resume,
    setup_world,
    train,
    train_step,
)

BATCHES_PER_EPOCH = 18  # of the small config (tests/helpers.py)

# With 300 subwords, some validation sentences exceed max_len 64; translate warns that it cuts them.
pytestmark = pytest.mark.filterwarnings("ignore:.*were cut; their translations cover the start only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_state(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Weights, trainer tensors and trainer info of a run's 'last' checkpoint."""
    last = resolve_checkpoint(run, "last")
    info = read_checkpoint_json(last, "trainer.json")
    return load_file(str(last / "model.safetensors")), load_file(str(last / "trainer.safetensors")), info


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(autouse=True)
def keep_thread_count():
    """train() sets the process's thread count; give the rest of the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task():
    return build_task(small_config())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short run stopped by max_steps, with evaluations mid-epoch and an averaged model."""
    config = small_config(max_steps=8, eval_every=3, average_last=2)
    out = tmp_path_factory.mktemp("runs") / "run"
    summary = train(config, out, progress=False, echo=quiet)
    return config, out, summary


# -- the schedule and the batches -------------------------------------------------------------------
def test_learning_rate_follows_the_configured_schedule():
    noam = small_config(schedule="noam", d_model=32, warmup=10, lr=0.5)
    for step in (1, 5, 10, 11, 40, 1000):
        assert learning_rate(noam, step) == noam_lr(step, 32, 10, 0.5)
    assert learning_rate(noam, 10) == pytest.approx(0.5 * (32 * 10) ** -0.5, rel=1e-12)
    assert learning_rate(noam, 40) == pytest.approx(0.5 * (32 * 40) ** -0.5, rel=1e-12)

    cosine = small_config(schedule="cosine", lr=1e-3, min_lr=1e-4, warmup=10, max_steps=110)
    for step in (1, 10, 60, 110, 200):
        assert learning_rate(cosine, step) == cosine_lr(step, 1e-3, 10, 110, 1e-4)
    assert learning_rate(cosine, 10) == pytest.approx(1e-3)
    assert learning_rate(cosine, 60) == pytest.approx(5.5e-4)
    assert learning_rate(cosine, 110) == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        learning_rate(noam, 0)


def test_batches_stay_within_max_tokens_for_the_real_lengths(task):
    limit = task.settings.max_tokens
    for epoch in (0, 1):
        batches = task.batches(epoch)
        assert len(batches) == BATCHES_PER_EPOCH
        assert sorted(i for b in batches for i in b.tolist()) == list(range(len(task.train_index)))
        for batch in batches:
            src, tgt = task.to_tensors(batch, torch.device("cpu"))  # (B, S), (B, T + 1)
            assert src.numel() <= limit  # what the encoder sees, padding included
            assert tgt[:, :-1].numel() <= limit  # the decoder's input
            assert tgt[:, 1:].numel() <= limit  # and the targets it predicts
    def listed(epoch):
        return [b.tolist() for b in task.batches(epoch)]

    assert listed(0) == listed(0)  # the same epoch always gives the same batches
    assert listed(0) != listed(1)


# -- exact resume -----------------------------------------------------------------------------------
def test_a_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    """Run B is SIGKILLed after its first checkpoint (mid-epoch) and resumed; it must end bit-equal to
    run A, which was never interrupted. Dropout is on, so the RNG state must be restored too."""
    steps, every = 25, 5  # checkpoints at 5, 10, ... all mid-epoch; the resumed run crosses epoch 1's end
    config = small_config(max_steps=steps, eval_every=every)
    train(config, tmp_path / "a", progress=False, echo=quiet)

    run_b = tmp_path / "b"
    log = open(tmp_path / "b.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "attnlab", "train", "--preset", "tiny", "--out", str(run_b), "--no-progress",
         *cli_flags(config)],
        cwd=tmp_path, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            pointer = run_b / "checkpoints.json"  # replaced atomically: never read half-written
            if pointer.exists() and json.loads(pointer.read_text()).get("last"):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        log.close()
    output = (tmp_path / "b.log").read_text()
    assert process.returncode == -signal.SIGKILL, f"run B was not killed mid-run:\n{output}"
    _, _, killed_at = last_state(run_b)
    assert every <= killed_at["step"] < steps and killed_at["batch"] != 0, killed_at  # a mid-epoch checkpoint

    summary = resume(run_b, progress=False, echo=quiet)
    assert summary["steps"] == steps

    weights_a, trainer_a, info_a = last_state(tmp_path / "a")
    weights_b, trainer_b, info_b = last_state(run_b)
    assert info_a["step"] == info_b["step"] == steps
    assert (info_a["epoch"], info_a["batch"]) == (info_b["epoch"], info_b["batch"]) == (1, steps - BATCHES_PER_EPOCH)
    assert_same_tensors(weights_a, weights_b)
    assert_same_tensors(trainer_a, trainer_b)  # Adam's moments and the RNG state as well


def test_a_run_resumed_from_an_epoch_end_checkpoint_ends_with_the_same_weights(tmp_path):
    config = small_config(epochs=2, eval_every=0)  # one checkpoint per epoch
    train(config, tmp_path / "a", progress=False, echo=quiet)
    train(config.override(epochs=1), tmp_path / "b", progress=False, echo=quiet)
    _, _, stopped_at = last_state(tmp_path / "b")
    assert (stopped_at["step"], stopped_at["epoch"], stopped_at["batch"]) == (BATCHES_PER_EPOCH, 1, 0)

    resume(tmp_path / "b", epochs=2, progress=False, echo=quiet)
    weights_a, trainer_a, info_a = last_state(tmp_path / "a")
    weights_b, trainer_b, info_b = last_state(tmp_path / "b")
    assert info_a["step"] == info_b["step"] == 2 * BATCHES_PER_EPOCH
    assert_same_tensors(weights_a, weights_b)
    assert_same_tensors(trainer_a, trainer_b)


def test_resume_takes_every_setting_from_the_run_and_only_run_length_from_the_caller(tmp_path):
    first = small_config(max_steps=3, eval_every=3, time_limit=0.0)
    train(first, tmp_path, progress=False, echo=quiet)
    summary = resume(tmp_path, max_steps=5, progress=False, echo=quiet)
    assert summary["steps"] == 5
    saved = TrainConfig.from_dict(read_checkpoint_json(resolve_checkpoint(tmp_path, "last"), "config.json")["train"])
    assert saved == first.override(max_steps=5)  # the preset's 6-minute limit and 30 epochs did not come back
    assert saved.time_limit == 0.0 and saved.epochs == first.epochs


@pytest.mark.parametrize("changes, names", [({"d_model": 64}, "d_model"), ({"lr": 0.1, "vocab_size": 9}, "lr, vocab_size")])
def test_resume_refuses_to_change_what_a_run_cannot_change(tmp_path, changes, names):
    train(small_config(max_steps=1, eval_every=1), tmp_path, progress=False, echo=quiet)
    before = (tmp_path / "checkpoints.json").read_text()
    with pytest.raises(ValueError, match=f"cannot change {names} when resuming"):
        resume(tmp_path, progress=False, echo=quiet, **changes)
    assert (tmp_path / "checkpoints.json").read_text() == before


def test_resuming_a_run_that_reached_max_steps_takes_no_step(tmp_path):
    config = small_config(max_steps=3, eval_every=3)
    train(config, tmp_path, progress=False, echo=quiet)
    before, _, _ = last_state(tmp_path)
    summary = resume(tmp_path, progress=False, echo=quiet)
    assert summary["steps"] == 3
    assert summary["stop_reason"] == "reached max_steps=3"
    after, _, info = last_state(tmp_path)
    assert info["step"] == 3
    assert_same_tensors(before, after)


def test_starting_over_an_existing_run_asks_for_resume(finished_run):
    config, out, _ = finished_run
    before = (out / "checkpoints.json").read_text()
    with pytest.raises(AttnlabError, match="--resume"):
        train(config, out, progress=False, echo=quiet)
    assert (out / "checkpoints.json").read_text() == before


def test_resume_without_a_run_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resume(tmp_path / "none", progress=False, echo=quiet)


# -- data parallel ----------------------------------------------------------------------------------
DDP_LR = 1.0  # SGD on gradients clipped to norm 1: steps of about 1e-3 per weight


def _two_batches(task) -> list[np.ndarray]:
    """Two training batches with different shapes and different target token counts."""
    batches = task.batches(0)
    tokens = [int(task.to_tensors(b, torch.device("cpu"))[1][:, 1:].ne(task.pad_id).sum()) for b in batches]
    shapes = [tuple(task.to_tensors(b, torch.device("cpu"))[1].shape) for b in batches]
    first = 0
    second = next(i for i in range(1, len(batches)) if tokens[i] != tokens[first] and shapes[i] != shapes[first])
    return [batches[first], batches[second]]


def _fresh_model_and_optimizer(task, config):
    """The same initial weights in every process, and plain SGD.

    Not Adam: its first step is lr · g / |g|, which turns rounding noise in a gradient that is zero
    in exact arithmetic (the attention key bias: softmax ignores a constant added to a row of
    scores) into a full ±lr step. SGD shows the gradients themselves agree.
    """
    torch.manual_seed(1234)
    model = task.build_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.0)


def _ddp_worker(rank: int, world_size: int, port: int, config: dict, out: str) -> None:
    """One of two CPU processes: a DistributedDataParallel step on this rank's batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = TrainConfig.from_dict(config)
    world = setup_world(torch.device("cpu"))
    assert world == World(rank, world_size)
    try:
        task = build_task(config)
        model, optimizer = _fresh_model_and_optimizer(task, config)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        tensors = task.to_tensors(_two_batches(task)[rank], torch.device("cpu"))
        loss, n_tgt, _ = train_step(ddp, optimizer, task, tensors, DDP_LR, config, world)
        torch.save({"state": {k: v.clone() for k, v in model.state_dict().items()}, "loss": loss,
                    "tokens": n_tgt}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_step_one_process_takes_on_the_union(tmp_path):
    config = small_config(dropout=0.0)
    task = build_task(config)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), config.to_dict(), str(tmp_path)), nprocs=2)

    model, optimizer = _fresh_model_and_optimizer(task, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = _two_batches(task)
    union = task.to_tensors(np.concatenate([first, second]), torch.device("cpu"))  # both batches' rows, padded together
    loss, n_tgt, _ = train_step(model, optimizer, task, union, DDP_LR, config)

    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["tokens"] == n_tgt  # every rank reports the global batch's tokens
        assert result["loss"] == pytest.approx(loss, rel=1e-5)
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(result["state"][name], tensor, rtol=0, atol=1e-6, msg=name)
    moved = max(float((model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 100 * 1e-6  # the step is far larger than the tolerance


@pytest.mark.slow
def test_torchrun_trains_with_two_processes(tmp_path):
    out = tmp_path / "run"
    config = small_config(max_steps=2, eval_every=0, average_last=0)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "attnlab", "train", "--preset", "tiny",
               "--out", str(out), "--no-progress", *cli_flags(config)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["stop_reason"] == "reached max_steps=2"
    assert read_checkpoint_json(resolve_checkpoint(out, "last"), "trainer.json")["step"] == 2


def torchrun(argv: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), "-m", "attnlab", *argv]
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def trainer_info(run: Path) -> dict:
    return read_checkpoint_json(resolve_checkpoint(run, "last"), "trainer.json")


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_a_run_resumes_at_another_world_size_without_repeating_or_skipping_batches(tmp_path, first, then):
    """The stored batch position is global (batches taken by all processes), so a run written by N
    processes continues with M at the next unused batch: after s steps with N processes and t with M,
    N·s + M·t batches of the epoch are used, none twice."""
    run = tmp_path / "run"
    config = small_config(max_steps=2, eval_every=2, dropout=0.0)
    start = ["train", "--preset", "tiny", "--out", str(run), "--no-progress", *cli_flags(config)]
    if first == 1:
        train(config, run, progress=False, echo=quiet)
    else:
        torchrun(start, tmp_path)
    assert (trainer_info(run)["batch"], trainer_info(run)["world_size"]) == (2 * first, first)
    more = ["train", "--out", str(run), "--resume", "--no-progress", "--max-steps", "4"]
    if then == 1:
        resume(run, max_steps=4, progress=False, echo=quiet)
    else:
        assert "continues with 2" in torchrun(more, tmp_path).stdout
    info = trainer_info(run)
    assert (info["step"], info["epoch"], info["batch"], info["world_size"]) == (4, 0, 2 * first + 2 * then, then)


@pytest.mark.slow
def test_two_processes_through_torchrun_match_one_process_on_the_same_global_batches(tmp_path):
    """A whole short run (Adam with warm-up, gradient clipping; dropout 0 so that both sides compute the
    same function) with 2 processes ends within 1e-4 (weights move by ~0.2) of one process stepping on the union of the
    same two batches each step. Adam's epsilon is 1e-6 here: with the paper's 1e-9, a gradient that is
    zero in exact arithmetic (a key bias) but rounding noise in floating point gets a full ±lr step
    of either sign, which says nothing about the data-parallel step."""
    steps = 6
    config = small_config(max_steps=steps, eval_every=steps, dropout=0.0, adam_eps=1e-6, warmup=3, clip_norm=0.5)
    run = tmp_path / "run"
    torchrun(["train", "--preset", "tiny", "--out", str(run), "--no-progress", *cli_flags(config)], tmp_path)
    ddp = load_file(str(resolve_checkpoint(run, "last") / "model.safetensors"))

    torch.manual_seed(config.seed)
    task = build_task(config)
    model = task.build_model()
    optimizer = build_adam(model, (config.adam_beta1, config.adam_beta2), config.adam_eps, config.weight_decay)
    batches = task.batches(0)
    for step in range(1, steps + 1):
        union = np.concatenate([batches[2 * step - 2], batches[2 * step - 1]])
        train_step(model, optimizer, task, task.to_tensors(union, torch.device("cpu")), learning_rate(config, step), config)
    single = {k: v for k, v in model.state_dict().items() if k in ddp}
    assert single.keys() == ddp.keys()
    worst = max(float((single[k] - ddp[k]).abs().max()) for k in ddp)
    moved = max(float((single[k] - v).abs().max()) for k, v in _initial_weights(task, config).items() if k in ddp)
    assert worst < 1e-4 and moved > 0.05, (worst, moved)  # measured: 3.6e-5 and 0.22

    torchrun(["train", "--out", str(run), "--resume", "--no-progress", "--max-steps", str(steps + 2)], tmp_path)
    assert trainer_info(run)["step"] == steps + 2  # its checkpoints resume, with two processes too


def _initial_weights(task, config) -> dict[str, torch.Tensor]:
    torch.manual_seed(config.seed)
    return task.build_model().state_dict()


# -- stopping -----------------------------------------------------------------------------------------
def test_max_steps_stops_the_run(finished_run):
    _, out, summary = finished_run
    assert summary["steps"] == 8
    assert summary["stop_reason"] == "reached max_steps=8"
    assert read_checkpoint_json(resolve_checkpoint(out, "last"), "trainer.json")["step"] == 8


def test_patience_stops_early(tmp_path):
    # An untrained model's greedy BLEU on 10 sentences stays 0.0: the first evaluation sets the best,
    # the next two do not improve on it, and patience 2 stops the run at the third.
    config = small_config(eval_every=2, patience=2, max_steps=40)
    summary = train(config, tmp_path, progress=False, echo=quiet)
    assert summary["stop_reason"] == "no improvement in 2 evaluations"
    assert summary["steps"] == 6
    evals = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [row["val_bleu"] for row in evals if row["event"] == "eval"] == [0.0, 0.0, 0.0]


def test_time_limit_stops_the_run(tmp_path):
    config = small_config(time_limit=0.0005, max_steps=1000)  # 30 ms of training
    summary = train(config, tmp_path, progress=False, echo=quiet)
    assert summary["stop_reason"] == "reached the time limit of 0.0005 minutes"
    assert 1 <= summary["steps"] < 1000
    assert read_checkpoint_json(resolve_checkpoint(tmp_path, "last"), "trainer.json")["step"] == summary["steps"]


def test_epochs_end_the_run_with_one_evaluation_each(tmp_path):
    summary = train(small_config(epochs=2), tmp_path, progress=False, echo=quiet)
    assert summary["stop_reason"] == "finished 2 epochs"
    assert summary["steps"] == 2 * BATCHES_PER_EPOCH and summary["epochs_completed"] == 2
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "eval"] == [BATCHES_PER_EPOCH, 2 * BATCHES_PER_EPOCH]


# -- the run directory --------------------------------------------------------------------------------
def test_the_log_the_plot_and_the_summary(finished_run):
    _, out, summary = finished_run
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 8]
    for row in evals:
        assert {"epoch", "lr", "train_loss", "val_loss", "val_ppl", "val_bleu", "tokens_per_s"} <= row.keys()
        assert row["lr"] == learning_rate(finished_run[0], row["step"])
        assert row["train_loss"] > 0 and row["val_loss"] > 0
    (average,) = [r for r in rows if r["event"] == "average"]
    assert average["checkpoints"] == ["step-0000006", "step-0000008"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    pointer = json.loads((out / "checkpoints.json").read_text())
    best_bleu = next(h["val_bleu"] for h in pointer["history"] if h["checkpoint"] == pointer["best"])
    assert summary["model"] == ("ckpt/averaged" if average["val_bleu"] > best_bleu else pointer["best"])
    assert resolve_checkpoint(out) == out / summary["model"]


@pytest.mark.parametrize("scores, chosen", [((1.0, 2.0, 3.0), "ckpt/averaged"), ((3.0, 1.0, 2.0), "ckpt/step-0000002")])
def test_the_model_is_the_better_of_the_average_and_the_best_checkpoint(tmp_path, monkeypatch, scores, chosen):
    """Evaluations at steps 2 and 4 score scores[0] and scores[1], the average of both scores[2]."""
    given = iter(scores)
    monkeypatch.setattr(TranslationTask, "evaluate", lambda self, model, device: {"val_bleu": next(given)})
    summary = train(small_config(max_steps=4, eval_every=2, average_last=2), tmp_path, progress=False, echo=quiet)
    assert summary["model"] == chosen
    assert summary["val_bleu"] == max(scores[2], max(scores[:2]))
    assert resolve_checkpoint(tmp_path) == tmp_path / chosen


def test_every_checkpoint_stores_the_train_config(finished_run, task):
    config, out, _ = finished_run
    checkpoints = sorted(p.name for p in (out / "ckpt").iterdir())
    assert checkpoints == ["averaged", "step-0000003", "step-0000006", "step-0000008"]  # keep_last=3
    for directory in [out] + [out / "ckpt" / name for name in checkpoints]:
        saved = read_checkpoint_json(directory, "config.json")
        assert saved["kind"] == "translation"
        assert TrainConfig.from_dict(saved["train"]) == config
        assert saved["model"] == task.model_config().to_dict()
    pointer = json.loads((out / "checkpoints.json").read_text())
    assert pointer["last"] == "ckpt/step-0000008"
    assert [h["checkpoint"] for h in pointer["history"]] == ["ckpt/step-0000003", "ckpt/step-0000006", "ckpt/step-0000008"]


# -- the language model, end to end ---------------------------------------------------------------
def test_a_language_model_trains_loads_and_generates_through_the_command_line(tmp_path, capsys):
    from attnlab.app.cli import main
    from attnlab.decode.generate import generate, load_language_model

    run = tmp_path / "lm"
    flags = ["--max-steps", "4", "--eval-every", "2", "--num-layers", "1", "--d-model", "32", "--num-heads", "2",
             "--d-ff", "64", "--context", "16", "--batch-size", "4", "--warmup", "2", "--threads", "1"]
    assert main(["train", "--preset", "shakespeare-char", "--out", str(run), "--no-progress", *flags]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_loss"] > 0
    saved = TrainConfig.from_dict(read_checkpoint_json(resolve_checkpoint(run), "config.json")["train"])
    assert saved.kind == "lm" and (saved.task.num_layers, saved.task.context) == (1, 16)
    capsys.readouterr()

    assert main(["generate", "--checkpoint", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                 "--seed", "3", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    model, vocab = load_language_model(run)
    ids = generate(model, torch.tensor([vocab.encode("ROMEO:")]), 30, temperature=0.8, seed=3)
    assert printed == vocab.decode(ids[0].tolist()) + "\n"
    assert printed.startswith("ROMEO:") and ids.shape == (1, len("ROMEO:") + 30)


# -- the train command ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--context", "5"], "setting context belongs to language-model training, not to this translation run"),
    (["--preset", "shakespeare-char", "--src-lang", "fr"], "setting src_lang belongs to translation training"),
    (["--preset", "tiny", "--lr", "-1"], "setting lr must be > 0, got -1.0"),
    (["--preset", "tiny", "--resume"], "--preset does not apply to --resume"),
])
def test_train_flags_that_do_not_apply_give_one_line(tmp_path, capsys, argv, message):
    from attnlab.app.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_train_resume_from_the_command_line_keeps_the_runs_settings(tmp_path, capsys):
    from attnlab.app.cli import main

    config = small_config(max_steps=2, eval_every=2, average_last=0)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path), "--no-progress", *cli_flags(config)]) == 0
    assert main(["train", "--out", str(tmp_path), "--resume", "--no-progress", "--max-steps", "3"]) == 0
    saved = TrainConfig.from_dict(read_checkpoint_json(resolve_checkpoint(tmp_path, "last"), "config.json")["train"])
    assert saved == config.override(max_steps=3)  # not the default preset's settings
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), "--resume", "--d-model", "64"]) == 2
    assert "cannot change d_model when resuming" in capsys.readouterr().err


# -- the run's own files are checked, not trusted -------------------------------------------------
def test_trainer_state_round_trips_and_checks_every_field():
    from attnlab.store.checkpoint import CheckpointError
    from attnlab.train.trainer import TrainerState

    state = TrainerState(step=5, epoch=1, batch=2, elapsed=3.5, train_seconds=2.0, tokens=900, best=1.5,
                         stale=1, metrics={"val_bleu": 1.5})
    assert TrainerState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    for bad, message in [({"step": "5"}, "field 'step' must be int"), ({"best": True}, "field 'best'"),
                         ({"batch": -1}, "must be >= 0"), ({"colour": 1}, "unknown fields")]:
        with pytest.raises(CheckpointError, match=message):
            TrainerState.from_dict({**state.to_dict(), **bad}, "run/ckpt/step-5/trainer.json")
    with pytest.raises(CheckpointError, match="run/trainer.json: expected an object"):
        TrainerState.from_dict([1], "run/trainer.json")


def test_a_crafted_pointer_file_cannot_make_pruning_delete_outside_the_run(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim"
    config = small_config(max_steps=2, eval_every=1, keep_last=1, average_last=0)
    train(config, run, progress=False, echo=quiet)
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    pointer = json.loads((run / "checkpoints.json").read_text())
    pointer["history"].insert(0, {"checkpoint": "ckpt/step-0000000/../../../victim", "val_bleu": 0.0})
    (run / "checkpoints.json").write_text(json.dumps(pointer))
    with pytest.raises(ValueError, match="outside"):
        resume(run, max_steps=3, progress=False, echo=quiet)
    assert (victim / "precious.txt").read_text() == "keep me"
