"""The training loop: a small ``Trainer`` that steps, evaluates and checkpoints, and knows when to stop.

What a run does, in order: build the task (data, vocabulary) and the model, or take them from the
run's last checkpoint when resuming; then step through deterministic batches with Adam and the
configured schedule, gradient clipping and (on CUDA) bf16 autocast; evaluate every ``eval_every``
steps or each epoch, write a checkpoint each time (atomically), keep the best and the last
``keep_last``; stop at the epoch, step or time limit, or early when the metric stops improving;
finally average the last checkpoints, as the paper does, and export the better of the average and
the best as the run's model.

Exact resume: a checkpoint holds the model, Adam's moments, the RNG state and a ``TrainerState``
(step, data position, clocks, best metric), so a run killed and resumed ends with the same weights
as one never interrupted. A resumed run takes every setting from its checkpoint; only the length
of the run and the machine (``RESUMABLE_FIELDS``) may be changed.

Scale-out: under ``torchrun --nproc_per_node N -m attnlab train ...`` each process takes every N-th
batch, gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on GPU), and the loss
is normalised by the token count of the whole global batch, so N processes take the same step as
one process would on the union of their batches.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple, get_type_hints

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import CheckpointError, DataError, RunDirectoryError, TrainingInterrupted
from ..inspect.plots import plot_training_log
from ..store.checkpoint import (
    POINTER,
    average_checkpoints,
    checkpoint_in_run,
    load_model_state,
    load_trainer_state,
    read_checkpoint_json,
    read_json,
    remove_orphans,
    resolve_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from ..store.fields import fits
from ..store.files import write_text_atomic
from ..store.runlock import RunLock
from .config import RESUMABLE_FIELDS, TrainConfig
from .optim import build_adam, cosine_lr, noam_lr
from .tasks import Task, build_task

__all__ = [
    "World", "TrainerState", "StepStats", "Trainer", "train", "resume", "train_step", "learning_rate",
    "setup_world", "pick_device",
]


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    """The device to train on: ``auto`` (a GPU where PyTorch sees one), ``cpu``, ``cuda`` or ``cuda:N``.

    Under ``torchrun`` (``LOCAL_RANK`` set) plain ``cuda`` means this process's own GPU, number
    LOCAL_RANK on its machine, made the current one, as NCCL and DDP expect: without that every
    process of a machine would train on GPU 0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but PyTorch sees no CUDA GPU here")
    local = os.environ.get("LOCAL_RANK")
    if device.index is None and local is not None:
        count = torch.cuda.device_count()
        if not (local.isdigit() and int(local) < count):
            raise ValueError(f"LOCAL_RANK={local} (set by torchrun) names no GPU of the {count} PyTorch sees here: "
                             f"start at most {count} process(es) per machine (--nproc-per-node)")
        device = torch.device("cuda", int(local))
    if device.index is not None:
        torch.cuda.set_device(device)
    return device


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


class StepStats(NamedTuple):
    """One optimisation step, over the global batch (all processes)."""

    loss: float  # mean loss per predicted token
    tokens: int  # predicted tokens
    tokens_read: int  # every token the model read


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, tensors: tuple[Tensor, ...],
    lr: float, config: TrainConfig, world: World = World(),
) -> StepStats:
    """One optimisation step on one batch.

    The loss is divided by the predicted tokens of the *global* batch (summed over processes) and
    multiplied by the world size, because DistributedDataParallel averages gradients.
    """
    device = tensors[0].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
        stats = task.loss(model, tensors)
    totals = torch.stack([stats.tokens.detach().float(), stats.loss_sum.detach().float(),
                          torch.tensor(float(stats.tokens_read), device=device)])
    if world.size > 1:
        dist.all_reduce(totals)
    global_tokens, global_loss, global_read = totals[0].clamp(min=1), totals[1], int(totals[2])
    (stats.loss_sum * world.size / global_tokens).backward()
    if config.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(float(global_loss / global_tokens), int(totals[0]), global_read)


# -- where a run stands --------------------------------------------------------------------------
@dataclass
class TrainerState:
    """Where a run stands: saved as ``trainer.json`` in every training checkpoint."""

    step: int = 0  # optimisation steps taken
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch taken so far, by all processes together
    elapsed: float = 0.0  # seconds since the run started, evaluations included
    train_seconds: float = 0.0  # seconds spent in training steps
    tokens: int = 0  # tokens read by the model, all processes
    best: float | None = None  # best value of the task's metric so far
    stale: int = 0  # evaluations since the best one
    metrics: dict[str, Any] = field(default_factory=dict)  # the last evaluation's
    world_size: int = 1  # processes that wrote this state (the batch position is global, any may resume)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "trainer.json") -> "TrainerState":
        """Rebuild a state, checking every field's type; ``source`` names the file in errors."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected an object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise CheckpointError(f"{source}: unknown fields {unknown}")
        hints = get_type_hints(cls)
        for name, value in data.items():
            if not fits(hints[name], value):
                raise CheckpointError(f"{source}: field {name!r} must be {known[name].type}, got {value!r}")
        state = cls(**data)
        if min(state.step, state.epoch, state.batch, state.tokens, state.stale) < 0 or state.world_size < 1:
            raise CheckpointError(f"{source}: step, epoch, batch, tokens and stale must be >= 0, world_size >= 1")
        return state


class _Window:
    """Training loss and throughput since the last evaluation."""

    def __init__(self) -> None:
        self.loss, self.steps, self.tokens, self.started = 0.0, 0, 0, time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.loss, self.steps, self.tokens = self.loss + stats.loss, self.steps + 1, self.tokens + stats.tokens_read

    def summary(self, now: float) -> dict[str, float]:
        return {"train_loss": round(self.loss / max(1, self.steps), 4),
                "tokens_per_s": round(self.tokens / max(1e-9, now - self.started))}


def _stop_for_steps(limit: int) -> str:
    return f"reached max_steps={limit}"


def _stop_for_time(minutes: float) -> str:
    return f"reached the time limit of {minutes:g} minutes"


def _stop_for_patience(evaluations: int) -> str:
    return f"no improvement in {evaluations} evaluations"


def _stop_for_epochs(epochs: int) -> str:
    return f"finished {epochs} epochs"


# -- trainer state in tensors (never pickled) ------------------------------------------------------
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
    fused = bool(optimizer.defaults.get("fused"))  # the fused kernel keeps its step counts on the device too
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, field_name = key[len("optim/") :].rsplit("/", 1)
            if name not in params:
                raise CheckpointError(f"checkpoint has optimizer state for unknown parameter {name}")
            p = params[name]
            optimizer.state[p][field_name] = value.to(p.device) if value.dim() or fused else value
    if "rng/torch" not in tensors:
        raise CheckpointError("trainer.safetensors holds no RNG state ('rng/torch')")
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


# -- the run directory --------------------------------------------------------------------------
class _Run:
    """The run directory: log, pointer file, checkpoint rotation. Used on the main process only."""

    LATEST = "latest"  # the resumable checkpoint written between evaluations (interrupt, --save-every)

    def __init__(self, out_dir: Path, config: TrainConfig, task: Task, model_config: dict[str, Any]) -> None:
        self.dir = out_dir
        self.config = config
        self.task = task
        self.model_config = model_config
        self.log_path = out_dir / "train.jsonl"
        self.pointer = _read_pointer(out_dir / POINTER) if (out_dir / POINTER).exists() else {"history": []}

    def log(self, row: dict[str, Any]) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def forget_log_after(self, step: int) -> int:
        """Drop log rows of steps after ``step`` (written before a save that never completed)."""
        if not self.log_path.exists():
            return 0
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            write_text_atomic(self.log_path, "".join(line + "\n" for line in kept))
        return len(lines) - len(kept)

    def config_json(self) -> dict[str, Any]:
        data = self.task.data_info()
        return {"kind": self.task.kind, "model": self.model_config, "train": self.config.to_dict(),
                **({"data": data} if data else {})}

    def save(self, name: str, model: nn.Module, tensors=None, info=None) -> Path:
        return save_checkpoint(self.dir / "ckpt" / name, model, self.config_json(), self.task.vocab_json(), tensors, info)

    def record(self, name: str, metrics: dict[str, float], improved: bool) -> None:
        self.pointer["last"] = f"ckpt/{name}"
        if improved:
            self.pointer["best"] = f"ckpt/{name}"
        self.pointer["history"].append({"checkpoint": f"ckpt/{name}", **metrics})
        self._prune()
        write_json_atomic(self.dir / POINTER, self.pointer)
        latest = self.dir / "ckpt" / self.LATEST
        if latest.exists():  # superseded by this evaluated checkpoint
            shutil.rmtree(latest)

    def record_latest(self) -> None:
        self.pointer["last"] = f"ckpt/{self.LATEST}"
        write_json_atomic(self.dir / POINTER, self.pointer)

    def _inside(self, relative: str) -> Path:
        return checkpoint_in_run(self.dir, relative, f"{self.dir / POINTER}: history")

    def _step_checkpoints(self) -> list[str]:
        steps = [h["checkpoint"] for h in self.pointer["history"] if h["checkpoint"].startswith("ckpt/step-")]
        return list(dict.fromkeys(steps))

    def _prune(self) -> None:
        keep = {self.pointer.get("best"), self.pointer.get("last"), self.pointer.get("model")}
        steps = self._step_checkpoints()
        keep |= set(steps[-max(1, self.config.keep_last) :])
        for name in steps:
            path = self._inside(name)
            if name not in keep and path.exists():
                shutil.rmtree(path)

    def recent_steps(self, n: int) -> list[Path]:
        return [path for path in map(self._inside, self._step_checkpoints()[-n:]) if path.exists()]

    def set_model(self, relative: str) -> None:
        self.pointer["model"] = relative
        write_json_atomic(self.dir / POINTER, self.pointer)

    def plot(self, metrics: tuple[str, ...]) -> None:
        rows = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        plot_training_log([r for r in rows if r.get("event") == "eval"], metrics, self.dir / "loss.png")


def _read_pointer(path: Path) -> dict[str, Any]:
    """A run's ``checkpoints.json``, checked: an object whose history lists checkpoint entries."""
    pointer = read_json(path)
    history = pointer.get("history") if isinstance(pointer, dict) else None
    if not isinstance(history, list) or not all(isinstance(h, dict) and isinstance(h.get("checkpoint"), str)
                                                for h in history):
        raise CheckpointError(f"{path}: expected an object with a 'history' list of {{'checkpoint': ...}} entries")
    return pointer


# -- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """One training run: ``Trainer.start`` (a new run) or ``Trainer.resume``, then ``fit()``.

    The main process holds the run directory's lock (``attnlab.store.runlock``) from the moment
    the trainer is made until ``fit`` ends, so no second writer can mix its files into the run.
    """

    def __init__(
        self, config: TrainConfig, out_dir: str | Path, *, resume_from: Path | None = None,
        progress: bool = True, echo: Callable[[str], None] = print, lock: RunLock | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.lock = lock
        self.device = pick_device(config.device)
        self.world = setup_world(self.device)
        if self.device.type == "cuda" and config.amp and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
            # Under bf16 autocast PyTorch's attention picks cuDNN's kernel, which builds a graph for every
            # new (batch, length) shape: on an H100 the first epoch's steps took 0.3-8 s each, against
            # about 0.02 s with the flash or memory-efficient kernels, which take any shape as it comes.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.say = echo if self.world.is_main else (lambda _message: None)
        vocab = read_checkpoint_json(resume_from, "vocab.json") if resume_from else None

        torch.manual_seed(config.seed)  # the same initial weights on every process
        self.task = self._build_task(config, vocab, resume_from)
        self.config = config = self.task.config  # completed from the data (a prepared dataset's languages)
        self.model = self.task.build_model().to(self.device)
        self.optimizer = build_adam(self.model, (config.adam_beta1, config.adam_beta2), config.adam_eps,
                                    config.weight_decay)
        self.state = TrainerState(world_size=self.world.size)
        if resume_from is not None:
            load_model_state(self.model, resume_from, self.device)
            tensors, info = load_trainer_state(resume_from)
            _restore_trainer(self.model, self.optimizer, tensors)
            self.state = TrainerState.from_dict(info, str(resume_from / "trainer.json"))
            if self.state.world_size != self.world.size:
                self.say(f"the run was written by {self.state.world_size} process(es), continues with "
                         f"{self.world.size}: batch position {self.state.batch} of epoch {self.state.epoch + 1} "
                         "is global, so no batch is repeated or skipped")
                self.state.world_size = self.world.size
        if self.world.rank > 0:  # distinct dropout streams: rank 0 keeps the run's own
            torch.manual_seed((config.seed * 1_000_003 + self.world.rank * 7919 + self.state.step) % 2**63)
        self.ddp: nn.Module = self.model
        if self.world.size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.run = _Run(self.out_dir, config, self.task, self.task.model_config().to_dict()) if self.world.is_main else None
        self.window = _Window()
        self._signal: int | None = None

    def _build_task(self, config: TrainConfig, vocab: dict[str, Any] | None, resume_from: Path | None) -> Task:
        """The task, built by the main process first: it may prepare Multi30k into the shared cache."""
        if self.world.size > 1 and not self.world.is_main:
            # Wait for the main process to prepare the data; if it failed, fail with its message
            # (rather than hang at the barrier or die on a closed connection).
            dist.barrier()
            failure: list[str | None] = [None]
            dist.broadcast_object_list(failure, src=0)
            if failure[0] is not None:
                raise DataError(f"the main process could not set up the data: {failure[0]}")
        try:
            task = build_task(config, vocab, progress=self.progress and self.world.is_main)
        except Exception as error:
            if self.world.size > 1 and self.world.is_main:
                dist.barrier()
                dist.broadcast_object_list([str(error)], src=0)
            raise
        if self.world.size > 1 and self.world.is_main:
            dist.barrier()
            dist.broadcast_object_list([None], src=0)
        saved = read_checkpoint_json(resume_from, "config.json").get("data") if resume_from else None
        if isinstance(saved, dict) and saved.get("fingerprint") != task.data_info().get("fingerprint"):
            raise DataError(f"{task.data_info().get('path')}: this prepared data is not the data the run in {self.out_dir} "
                            f"was trained on (fingerprint {saved.get('fingerprint')!r}, now "
                            f"{task.data_info().get('fingerprint')!r}); prepare it again from the same files and "
                            "settings, or start a new run")
        return task

    # -- making one ------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: TrainConfig, out_dir: str | Path, **kwargs: Any) -> "Trainer":
        """A new run in ``out_dir``, which must not hold one already and must be writable."""
        out_dir = Path(out_dir)
        lock = _lock_run(out_dir)
        try:
            if (out_dir / POINTER).exists():
                raise RunDirectoryError(f"{out_dir} already holds a run; pass --resume to continue it "
                                        "or pick another --out")
            if lock is not None:
                remove_orphans(out_dir)
            return cls(config, out_dir, lock=lock, **kwargs)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def resume(cls, out_dir: str | Path, changes: dict[str, Any] | None = None, **kwargs: Any) -> "Trainer":
        """The run in ``out_dir``, from its last checkpoint, with every setting the run had.

        ``changes`` may set only the length of the run and the machine (``RESUMABLE_FIELDS``);
        anything else is an error that names the setting. What a save that never completed left
        behind (temporary folders, log rows after the checkpoint) is cleaned first.
        """
        out_dir = Path(out_dir)
        last = resolve_checkpoint(out_dir, "last")
        saved = TrainConfig.from_dict(read_checkpoint_json(last, "config.json").get("train"),
                                      str(last / "config.json"))
        fixed = sorted(set(changes or {}) - set(RESUMABLE_FIELDS))
        if fixed:
            raise ValueError(f"cannot change {', '.join(fixed)} when resuming {out_dir}: a run keeps its settings; "
                             f"only {', '.join(RESUMABLE_FIELDS)} may change (start a new run for the others)")
        lock = _lock_run(out_dir)
        try:
            if lock is not None:
                remove_orphans(out_dir)
            trainer = cls(saved.override(**(changes or {})), out_dir, resume_from=last, lock=lock, **kwargs)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if trainer.run is not None:
            dropped = trainer.run.forget_log_after(trainer.state.step)
            if dropped:
                trainer.say(f"dropped {dropped} log row(s) written after {last.name} by a save that never completed")
        trainer.say(f"resuming {out_dir} from {last.name} (step {trainer.state.step})")
        return trainer

    # -- the three things a trainer does --------------------------------------------------------
    def step(self, batch: Any) -> StepStats:
        """One optimisation step: this process's batch of the global batch (one batch per process)."""
        started = time.perf_counter()
        tensors = self.task.to_tensors(batch, self.device)
        self.state.step += 1
        stats = train_step(self.ddp, self.optimizer, self.task, tensors, learning_rate(self.config, self.state.step),
                           self.config, self.world)
        self.state.batch += self.world.size  # the position is global: batches taken by all processes
        self.state.train_seconds += time.perf_counter() - started
        self.state.tokens += stats.tokens_read
        self.window.add(stats)
        return stats

    def evaluate_and_checkpoint(self) -> bool:
        """Evaluate, log and checkpoint on the main process; returns whether patience ran out (on all)."""
        out_of_patience = False
        state, task = self.state, self.task
        if self.world.is_main:
            now = time.perf_counter()
            metrics = task.evaluate(self.model, self.device)
            value = metrics[task.best_metric]
            improved = _better(task, value, state.best)
            state.best, state.stale = (value, 0) if improved else (state.best, state.stale + 1)
            state.metrics = metrics
            row = {"event": "eval", "step": state.step, "epoch": state.epoch,
                   "elapsed_min": round(state.elapsed / 60, 2), "lr": learning_rate(self.config, max(1, state.step)),
                   **self.window.summary(now), "eval_s": round(time.perf_counter() - now, 1), **metrics}
            self.run.log(row)
            self.say("  ".join(f"{k}={v}" for k, v in row.items() if k != "event"))
            name = f"step-{state.step:07d}"
            self.run.save(name, self.model, _trainer_tensors(self.model, self.optimizer), state.to_dict())
            self.run.record(name, metrics, improved)
            out_of_patience = bool(self.config.patience and state.stale >= self.config.patience)
            self.window = _Window()
        return _agree(out_of_patience, self.world)

    def save_latest(self) -> None:
        """Write a resumable checkpoint without evaluating (``ckpt/latest``; on SIGINT/SIGTERM and
        every ``save_every`` steps). The next evaluated checkpoint replaces it as the run's last."""
        if self.world.is_main:
            state = self.state
            self.run.save(_Run.LATEST, self.model, _trainer_tensors(self.model, self.optimizer), state.to_dict())
            self.run.record_latest()
            self.run.log({"event": "save", "step": state.step, "epoch": state.epoch,
                          "elapsed_min": round(state.elapsed / 60, 2)})

    def limit_reached(self) -> str | None:
        """Why the run must stop now (step or time limit, on every process alike), or None."""
        c = self.config
        if c.max_steps and self.state.step >= c.max_steps:
            return _stop_for_steps(c.max_steps)
        if c.time_limit and _agree(self.state.elapsed >= c.time_limit * 60, self.world):
            return _stop_for_time(c.time_limit)
        return None

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until a limit, write the summary and the plot, and return the summary.

        The process's thread count is set from ``config.threads`` for the run and restored after.
        SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it kills a job) finish
        the current step, write a resumable checkpoint and raise ``TrainingInterrupted``; the
        handlers that were there before are put back afterwards. The run's lock is released at the end.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads or max(1, (os.cpu_count() or 1) // self.world.size))
        handlers = self._catch_signals()
        try:
            return self._fit()
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
            torch.set_num_threads(threads)
            if self.lock is not None:
                self.lock.release()

    def _catch_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # only the main thread may set handlers; Ctrl-C then stops it the usual way

        def note(number: int, _frame: Any) -> None:
            if self._signal is not None and number == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, the last checkpoint stays
            self._signal = number

        return {number: signal.signal(number, note) for number in (signal.SIGINT, signal.SIGTERM)}

    def _interrupted(self) -> bool:
        return _agree(self._signal is not None, self.world)

    def _stop_on_signal(self) -> None:
        self.save_latest()
        number = self._signal or signal.SIGTERM
        name = signal.Signals(number).name
        where = f"{self.out_dir / 'ckpt' / _Run.LATEST}"
        message = (f"interrupted by {name} after step {self.state.step}; a resumable checkpoint is in {where}. "
                   f"Continue with: attnlab train --out {self.out_dir} --resume")
        self.say(message)
        raise TrainingInterrupted(message, number)

    def _fit(self) -> dict[str, Any]:
        c, state, world = self.config, self.state, self.world
        if world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out_dir / "config.json", self.run.config_json())
        n_params = sum(p.numel() for p in self.model.parameters())
        self.say(f"{self.task.describe()}; model {n_params / 1e6:.2f}M parameters on {self.device}"
                 + (f", {world.size} processes" if world.size > 1 else ""))
        wall_start, elapsed_before = time.perf_counter(), state.elapsed
        reason = _stop_for_steps(c.max_steps) if c.max_steps and state.step >= c.max_steps else None
        while reason is None and state.epoch < c.epochs:
            batches = self.task.batches(state.epoch)  # every process builds the same list
            steps = len(batches) // world.size  # steps in this epoch; a tail of < world.size batches is left
            if state.batch == 0:
                note = self.task.describe_epoch(batches)
                self.say(f"epoch {state.epoch + 1}: {steps} steps" + (f", {note}" if note else ""))
            bar = _progress(steps, state.batch // world.size, f"epoch {state.epoch + 1}", self.progress and world.is_main)
            self.ddp.train()
            while state.batch + world.size <= len(batches):
                if self._interrupted():
                    self._stop_on_signal()
                stats = self.step(batches[state.batch + world.rank])
                state.elapsed = elapsed_before + time.perf_counter() - wall_start
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{learning_rate(c, state.step):.2e}", refresh=False)
                reason = self.limit_reached()
                epoch_done = state.batch + world.size > len(batches)
                if epoch_done:
                    state.epoch, state.batch = state.epoch + 1, 0
                evaluate = reason or (c.eval_every and state.step % c.eval_every == 0) or (epoch_done and not c.eval_every)
                if evaluate and self.evaluate_and_checkpoint() and reason is None:
                    reason = _stop_for_patience(c.patience)
                elif not evaluate and c.save_every and state.step % c.save_every == 0:
                    self.save_latest()
                if reason or epoch_done:
                    break
            if bar is not None:
                bar.close()
        if self._interrupted() and reason is None:
            self._stop_on_signal()
        reason = reason or _stop_for_epochs(c.epochs)
        self.say(f"stopped: {reason}")

        summary: dict[str, Any] = {}
        if world.is_main:
            summary = self._finish()
            summary.update(steps=state.step, epochs_completed=state.epoch, train_minutes=round(state.elapsed / 60, 2),
                           tokens_per_s=round(state.tokens / max(1e-9, state.train_seconds)), stop_reason=reason,
                           parameters=n_params)
            write_json_atomic(self.out_dir / "summary.json", summary)
            self.run.plot(self.task.plot_metrics)
        if world.size > 1:
            dist.barrier()
        return summary

    def _finish(self) -> dict[str, Any]:
        """Average the last checkpoints, compare with the best, and point the run's model at the winner."""
        run, task, model = self.run, self.task, self.model
        best_dir = resolve_checkpoint(run.dir, "best")
        best_metrics = next(h for h in reversed(run.pointer["history"]) if h["checkpoint"] == run.pointer["best"])
        chosen, metrics = run.pointer["best"], {k: v for k, v in best_metrics.items() if k != "checkpoint"}
        recent = run.recent_steps(self.config.average_last) if self.config.average_last > 1 else []
        if len(recent) > 1:
            model.load_state_dict(average_checkpoints(recent), strict=False)
            averaged = task.evaluate(model, self.device)
            run.save("averaged", model)
            run.log({"event": "average", "checkpoints": [p.name for p in recent], **averaged})
            self.say(f"average of {len(recent)} checkpoints: " + "  ".join(f"{k}={v}" for k, v in averaged.items()))
            if _better(task, averaged[task.best_metric], metrics[task.best_metric]):
                chosen, metrics = "ckpt/averaged", averaged
        run.set_model(chosen)
        load_model_state(model, run.dir / chosen, self.device)
        self.say(f"model: {chosen} ({task.best_metric}={metrics[task.best_metric]})")
        return {"model": chosen, **metrics, "best_single": str(best_dir.relative_to(run.dir))}


def train(
    config: TrainConfig, out_dir: str | Path, *, progress: bool = True, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a new run as ``config`` says, into ``out_dir``; returns the summary (``summary.json``)."""
    return Trainer.start(config, out_dir, progress=progress, echo=echo).fit()


def resume(
    out_dir: str | Path, *, progress: bool = True, echo: Callable[[str], None] = print, **changes: Any,
) -> dict[str, Any]:
    """Continue the run in ``out_dir`` exactly where it stopped; ``changes``: see ``Trainer.resume``."""
    return Trainer.resume(out_dir, changes, progress=progress, echo=echo).fit()


def _lock_run(out_dir: Path) -> RunLock | None:
    """Check that ``out_dir`` can be written (before any work) and take its lock, on the main process.

    Under torchrun only rank 0 writes the run, so only it takes the lock.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test.", suffix=".tmp")
        probe.close()
    except OSError as e:
        raise RunDirectoryError(f"cannot write to --out {out_dir}: {e.strerror or e}") from None
    return RunLock(out_dir).acquire()


def _better(task: Task, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if task.higher_is_better else value < best


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
