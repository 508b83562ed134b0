"""The training loop: one function, ``train``, for every task, on one process or many.

What it does, in order: build the task (data, vocabulary) and the model; resume from the run's last
checkpoint if asked; then step through deterministic batches with Adam and the configured schedule,
gradient clipping and (on CUDA) bf16 autocast; evaluate every ``eval_every`` steps or each epoch,
write a checkpoint each time (atomically), keep the best and the last ``keep_last``; stop at the
epoch, step or time limit, or early when the metric stops improving; finally average the last
checkpoints, as the paper does, and export the better of the average and the best as the run's
model.

Exact resume: a checkpoint holds the model, Adam's moments, the step (the schedule is a function of
it), the RNG state and the data position (epoch and batch), so a run killed and resumed ends with
the same weights as one never interrupted.

Scale-out: under ``torchrun --nproc_per_node N -m attnlab train ...`` each process takes every N-th
batch, gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on GPU), and the loss
is normalised by the token count of the whole global batch, so N processes take the same step as
one process would on the union of their batches.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data.batching import shard
from ..store.checkpoint import (
    POINTER,
    average_checkpoints,
    load_model_state,
    load_trainer_state,
    read_checkpoint_json,
    resolve_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from .config import TrainConfig
from .optim import build_adam, cosine_lr, noam_lr
from .tasks import Task, build_task

__all__ = ["World", "train", "train_step", "learning_rate", "setup_world", "pick_device"]


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(name)


def setup_world(device: torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def learning_rate(config: TrainConfig, step: int) -> float:
    """The schedule's rate at ``step`` (counted from 1)."""
    if config.schedule == "noam":
        return noam_lr(step, config.d_model, config.warmup, config.lr)
    return cosine_lr(step, config.lr, config.warmup, config.max_steps, config.min_lr)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, tensors: tuple[Tensor, ...],
    lr: float, config: TrainConfig, world: World = World(),
) -> tuple[float, int, int]:
    """One optimisation step on one batch.

    Returns (mean loss per target token, target tokens, source tokens), all over the global batch.

    The loss is divided by the target tokens of the *global* batch (summed over processes) and
    multiplied by the world size, because DistributedDataParallel averages gradients.
    """
    device = tensors[0].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
        loss_sum, n_tokens, n_src = task.loss(model, tensors)
    stats = torch.stack([n_tokens.detach().float(), loss_sum.detach().float(),
                         torch.tensor(float(n_src), device=device)])
    if world.size > 1:
        dist.all_reduce(stats)
    global_tokens, global_loss, global_src = stats[0], stats[1], int(stats[2])
    (loss_sum * world.size / global_tokens.clamp(min=1)).backward()
    if config.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(global_loss / global_tokens.clamp(min=1)), int(global_tokens), global_src


# -- trainer state in tensors and JSON (never pickled) -------------------------------------------
def _trainer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    names = {id(p): name for name, p in model.named_parameters()}
    out = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng/cuda"] = torch.cuda.get_rng_state()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                out[f"optim/{names[id(p)]}/{key}"] = torch.as_tensor(value)
    return out


def _restore_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, field = key[len("optim/") :].rsplit("/", 1)
            if name not in params:
                raise ValueError(f"checkpoint has optimizer state for unknown parameter {name}")
            p = params[name]
            optimizer.state[p][field] = value.to(p.device) if value.dim() else value
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


# -- the run directory --------------------------------------------------------------------------
class _Run:
    """The run directory: log, pointer file, checkpoint rotation. Used on the main process only."""

    def __init__(self, out_dir: Path, config: TrainConfig, task: Task, model_config: dict[str, Any]) -> None:
        self.dir = out_dir
        self.config = config
        self.task = task
        self.model_config = model_config
        self.log_path = out_dir / "train.jsonl"
        pointer = out_dir / POINTER
        self.pointer = json.loads(pointer.read_text()) if pointer.exists() else {"history": []}

    def log(self, row: dict[str, Any]) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def config_json(self) -> dict[str, Any]:
        return {"kind": self.task.kind, "model": self.model_config, "train": self.config.to_dict()}

    def save(self, name: str, model: nn.Module, tensors=None, info=None) -> Path:
        return save_checkpoint(self.dir / "ckpt" / name, model, self.config_json(), self.task.vocab_json(), tensors, info)

    def record(self, name: str, metrics: dict[str, float], improved: bool) -> None:
        self.pointer["last"] = f"ckpt/{name}"
        if improved:
            self.pointer["best"] = f"ckpt/{name}"
        self.pointer["history"].append({"checkpoint": f"ckpt/{name}", **metrics})
        self._prune()
        write_json_atomic(self.dir / POINTER, self.pointer)

    def _prune(self) -> None:
        keep = {self.pointer.get("best"), self.pointer.get("last"), self.pointer.get("model")}
        steps = [h["checkpoint"] for h in self.pointer["history"] if h["checkpoint"].startswith("ckpt/step-")]
        steps = list(dict.fromkeys(steps))
        keep |= set(steps[-max(1, self.config.keep_last) :])
        for name in steps:
            if name not in keep and (self.dir / name).exists():
                shutil.rmtree(self.dir / name)

    def recent_steps(self, n: int) -> list[Path]:
        steps = [h["checkpoint"] for h in self.pointer["history"] if h["checkpoint"].startswith("ckpt/step-")]
        steps = list(dict.fromkeys(steps))[-n:]
        return [self.dir / s for s in steps if (self.dir / s).exists()]

    def set_model(self, relative: str) -> None:
        self.pointer["model"] = relative
        write_json_atomic(self.dir / POINTER, self.pointer)


def _better(task: Task, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if task.higher_is_better else value < best


def train(
    config: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a model as ``config`` says, writing checkpoints and logs into ``out_dir``.

    With ``resume=True`` the run continues from ``out_dir``'s last checkpoint exactly where it
    stopped (settings from the checkpoint, overridden by the length-of-run fields of ``config``).
    Returns a summary: steps, time, tokens per second and the final metrics.
    """
    out_dir = Path(out_dir)
    device = pick_device(config.device)
    world = setup_world(device)
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // world.size))
    say = echo if world.is_main else (lambda _msg: None)

    vocab, trainer_tensors, info = None, None, None
    if resume:
        last = resolve_checkpoint(out_dir, "last")
        saved = TrainConfig.from_dict(read_checkpoint_json(last, "config.json")["train"])
        config = saved.override(**{k: getattr(config, k) for k in _RUN_LENGTH_FIELDS})
        vocab = read_checkpoint_json(last, "vocab.json")
        trainer_tensors, info = load_trainer_state(last)
        say(f"resuming {out_dir} from {last.name} (step {info['step']})")
    elif (out_dir / POINTER).exists():
        raise ValueError(f"{out_dir} already holds a run; pass --resume to continue it or pick another --out")

    torch.manual_seed(config.seed)
    task = build_task(config, vocab)
    model = task.build_model().to(device)
    model_config = task.model_config().to_dict()
    optimizer = build_adam(model, (config.adam_beta1, config.adam_beta2), config.adam_eps, config.weight_decay)
    if resume:
        load_model_state(model, last, device)
        _restore_trainer(model, optimizer, trainer_tensors)
    run = _Run(out_dir, config, task, model_config) if world.is_main else None
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", run.config_json())
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{task.describe()}; model {n_params / 1e6:.2f}M parameters on {device}"
        + (f", {world.size} processes" if world.size > 1 else ""))

    ddp = model
    if world.size > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    step = info["step"] if info else 0
    epoch = info["epoch"] if info else 0
    position = info["batch"] if info else 0
    elapsed = info["elapsed"] if info else 0.0
    best = info.get("best") if info else None
    stale = info.get("stale", 0) if info else 0
    tokens_seen = info.get("tokens", 0) if info else 0
    train_seconds = info.get("train_seconds", 0.0) if info else 0.0
    stop_reason = None
    if config.max_steps and step >= config.max_steps:  # resumed at or past the limit: take no step
        stop_reason = f"reached max_steps={config.max_steps}"
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    wall_start, wall_before = time.perf_counter(), elapsed  # the time limit counts evaluations too

    def evaluate_and_save() -> bool:
        """Evaluate, checkpoint, log on the main process; returns whether to stop early."""
        nonlocal best, stale, window_loss, window_steps, window_tokens, window_start
        stop = False
        if world.is_main:
            now = time.perf_counter()
            metrics = task.evaluate(model, device)
            eval_seconds = time.perf_counter() - now
            value = metrics[task.best_metric]
            improved = _better(task, value, best)
            best, stale = (value, 0) if improved else (best, stale + 1)
            row = {
                "event": "eval", "step": step, "epoch": epoch, "elapsed_min": round(elapsed / 60, 2),
                "lr": learning_rate(config, max(1, step)),
                "train_loss": round(window_loss / max(1, window_steps), 4),
                "tokens_per_s": round(window_tokens / max(1e-9, now - window_start)),
                "eval_s": round(eval_seconds, 1), **metrics,
            }
            run.log(row)
            say("  ".join(f"{k}={v}" for k, v in row.items() if k != "event"))
            name = f"step-{step:07d}"
            state = {"step": step, "epoch": epoch, "batch": position, "elapsed": elapsed, "best": best,
                     "stale": stale, "tokens": tokens_seen, "train_seconds": train_seconds, "metrics": metrics}
            run.save(name, model, _trainer_tensors(model, optimizer), state)
            run.record(name, metrics, improved)
            stop = bool(config.patience and stale >= config.patience)
            window_loss, window_steps, window_tokens = 0.0, 0, 0
            window_start = time.perf_counter()
        return _agree(stop, world)

    while epoch < config.epochs and stop_reason is None:
        batches = shard(task.batches(epoch), world.rank, world.size)
        if position == 0 and world.is_main:
            say(f"epoch {epoch + 1}: {len(batches)} batches, padding {task_padding(task, batches):.1%}")
        bar = _progress(len(batches), position, f"epoch {epoch + 1}", progress and world.is_main)
        ddp.train()
        while position < len(batches):
            started = time.perf_counter()
            tensors = task.to_tensors(batches[position], device)
            step += 1
            loss, n_tgt, n_src = train_step(ddp, optimizer, task, tensors, learning_rate(config, step), config, world)
            position += 1
            seconds = time.perf_counter() - started
            elapsed = wall_before + time.perf_counter() - wall_start
            batch_tokens = n_tgt + n_src  # source and target, all processes
            tokens_seen += batch_tokens
            train_seconds += seconds
            window_loss, window_steps, window_tokens = window_loss + loss, window_steps + 1, window_tokens + batch_tokens
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{batch_tokens / seconds:,.0f}",
                                lr=f"{learning_rate(config, step):.2e}", refresh=False)
            if config.max_steps and step >= config.max_steps:
                stop_reason = f"reached max_steps={config.max_steps}"
            elif config.time_limit and _agree(elapsed >= config.time_limit * 60, world):
                stop_reason = f"reached the time limit of {config.time_limit:g} minutes"
            if stop_reason or (config.eval_every and step % config.eval_every == 0):
                if position == len(batches):
                    epoch, position = epoch + 1, 0
                if evaluate_and_save() and not stop_reason:
                    stop_reason = f"no improvement in {config.patience} evaluations"
                if stop_reason or position == 0:
                    break
        else:
            epoch, position = epoch + 1, 0
            if not config.eval_every and evaluate_and_save():
                stop_reason = f"no improvement in {config.patience} evaluations"
        if bar is not None:
            bar.close()
    stop_reason = stop_reason or f"finished {config.epochs} epochs"
    say(f"stopped: {stop_reason}")

    summary: dict[str, Any] = {}
    if world.is_main:
        summary = _finish(run, task, model, device, config, say)
        summary.update(steps=step, epochs_completed=epoch, train_minutes=round(elapsed / 60, 2),
                       tokens_per_s=round(tokens_seen / max(1e-9, train_seconds)), stop_reason=stop_reason,
                       parameters=n_params)
        write_json_atomic(out_dir / "summary.json", summary)
        _plot_losses(run.log_path, out_dir / "loss.png")
    if world.size > 1:
        dist.barrier()
    return summary


# Fields a resumed run takes from the command line rather than from its checkpoint.
_RUN_LENGTH_FIELDS = ("epochs", "max_steps", "time_limit", "patience", "device", "threads")


def task_padding(task: Task, batches: list[Any]) -> float:
    padding = getattr(task, "padding", None)
    return padding(batches) if padding else 0.0


def _agree(flag: bool, world: World) -> bool:
    """True on every process when it is true on any (so all processes stop at the same step)."""
    if world.size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _progress(total: int, done: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="batch", dynamic_ncols=True, mininterval=1.0)


def _finish(run: _Run, task: Task, model: nn.Module, device: torch.device, config: TrainConfig,
            say: Callable[[str], None]) -> dict[str, Any]:
    """Average the last checkpoints, compare with the best, and point the run's model at the winner."""
    best_dir = resolve_checkpoint(run.dir, "best")
    best_metrics = next(h for h in reversed(run.pointer["history"]) if h["checkpoint"] == run.pointer["best"])
    chosen, metrics = run.pointer["best"], {k: v for k, v in best_metrics.items() if k != "checkpoint"}
    recent = run.recent_steps(config.average_last) if config.average_last > 1 else []
    if len(recent) > 1:
        model.load_state_dict(average_checkpoints(recent), strict=False)
        averaged = task.evaluate(model, device)
        run.save("averaged", model)
        run.log({"event": "average", "checkpoints": [p.name for p in recent], **averaged})
        say(f"average of {len(recent)} checkpoints: " + "  ".join(f"{k}={v}" for k, v in averaged.items()))
        if _better(task, averaged[task.best_metric], metrics[task.best_metric]):
            chosen, metrics = "ckpt/averaged", averaged
    run.set_model(chosen)
    load_model_state(model, run.dir / chosen, device)
    say(f"model: {chosen} ({task.best_metric}={metrics[task.best_metric]})")
    return {"model": chosen, **metrics, "best_single": str(best_dir.relative_to(run.dir))}


def _plot_losses(log_path: Path, png_path: Path) -> None:
    """Training and validation loss against steps, from the JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("event") == "eval"]
    if not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in evals]
    ax.plot(steps, [r["train_loss"] for r in evals], marker="o", label="train loss (label-smoothed)")
    ax.plot(steps, [r["val_loss"] for r in evals], marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
