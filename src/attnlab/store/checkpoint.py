"""Checkpoints: weights in safetensors, configuration and vocabulary in JSON, written atomically.

A checkpoint is a directory::

    model.safetensors    model weights (tied weights stored once)
    config.json          {"kind": ..., "model": {...}, "train": {...}} as the run was configured
    vocab.json           {"src": <vocab json>, "tgt": <vocab json>} (one entry when shared)
    trainer.safetensors  optimizer moments and RNG states  (training checkpoints only)
    trainer.json         step, epoch, data position, schedule and metrics (training checkpoints only)

Every directory is first written under a temporary name and then renamed into place, so a crash
never leaves a half-written checkpoint; the run's pointer file ``checkpoints.json`` is replaced the
same way. Loading reads tensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CheckpointError
from .files import current_umask, replace_directory, write_text_atomic

__all__ = [
    "CheckpointError",
    "write_json_atomic",
    "save_checkpoint",
    "load_model_state",
    "read_checkpoint_json",
    "load_trainer_state",
    "resolve_checkpoint",
    "checkpoint_in_run",
    "average_checkpoints",
    "remove_orphans",
    "read_json",
]

POINTER = "checkpoints.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path``."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors with tied weights kept once (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    config: dict[str, Any],
    vocab: dict[str, Any],
    trainer_tensors: dict[str, Tensor] | None = None,
    trainer_info: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (build it under a temporary name, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700, made like any folder the user creates
        _save_tensors(_unique_state(model), tmp / "model.safetensors")
        write_json_atomic(tmp / "config.json", config)
        write_json_atomic(tmp / "vocab.json", vocab)
        if trainer_tensors is not None:
            _save_tensors({k: v.contiguous().cpu() for k, v in trainer_tensors.items()}, tmp / "trainer.safetensors")
        if trainer_info is not None:
            write_json_atomic(tmp / "trainer.json", trainer_info)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes 0600; give it the user's usual mode


def _require(directory: Path, name: str) -> Path:
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete attnlab checkpoint: {name} is missing")
    return path


def read_checkpoint_json(directory: Path, name: str) -> Any:
    """Read ``config.json``, ``vocab.json`` or ``trainer.json`` of a checkpoint."""
    path = _require(directory, name)
    return read_json(path)


def read_json(path: Path) -> Any:
    """A JSON file, or a CheckpointError that names the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_model_state(model: nn.Module, directory: Path, map_location: str | torch.device = "cpu") -> None:
    """Load weights saved by ``save_checkpoint`` into ``model`` (tied weights are restored by tying).

    Every tensor is checked before it is used: its dtype must be the model's (no int64 or half
    weights loaded silently), its shape the model's, and its values finite.
    """
    path = _require(directory, "model.safetensors")
    tensors = _load_tensors(path, str(map_location))
    expected = model.state_dict()
    for name, tensor in tensors.items():
        want = expected.get(name)
        if want is None:
            continue  # reported below with the other unexpected names (or turned by a load hook)
        if tensor.dtype != want.dtype:
            raise CheckpointError(f"{path}: tensor {name} is {tensor.dtype}, the model's is {want.dtype}")
        if tensor.shape != want.shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"the model's is {tuple(want.shape)} (a checkpoint of another model size?)")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shapes that a load hook joined, e.g. old separate Q/K/V weights
        raise CheckpointError(f"{path}: weights do not fit this model ({str(e).splitlines()[-1].strip()})") from None
    tied = {name for name in missing if _is_tied(model, name)}
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {directory} do not fit this model: missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )


def _is_tied(model: nn.Module, name: str) -> bool:
    """True when parameter ``name`` shares its storage with another state entry (weight tying)."""
    state = model.state_dict()
    ptr = state[name].data_ptr()
    return any(other != name and t.data_ptr() == ptr for other, t in state.items())


def load_trainer_state(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer/RNG tensors and the JSON trainer info of a training checkpoint."""
    tensors = _load_tensors(_require(directory, "trainer.safetensors"))
    return tensors, read_checkpoint_json(directory, "trainer.json")


def resolve_checkpoint(path: Path, which: str = "model") -> Path:
    """Find a checkpoint directory from a run directory or a checkpoint directory.

    A run directory resolves through its ``checkpoints.json``: ``which`` is "model" (the final
    exported model, else the best), "best" or "last".
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if (path / "model.safetensors").is_file():
        return path
    pointer = path / POINTER
    if not pointer.is_file():
        raise CheckpointError(
            f"{path} is neither a checkpoint (no model.safetensors) nor a run directory (no {POINTER})"
        )
    entries = read_json(pointer)
    if not isinstance(entries, dict):
        raise CheckpointError(f"{pointer}: expected an object, got {type(entries).__name__}")
    order = {"model": ("model", "best", "last"), "best": ("best",), "last": ("last",)}[which]
    for key in order:
        if entries.get(key):
            return checkpoint_in_run(path, entries[key], f"{pointer}: {key!r}")
    raise CheckpointError(f"{pointer} names no '{which}' checkpoint")


def checkpoint_in_run(run: Path, relative: Any, where: str) -> Path:
    """``run / relative`` for a name read from a run's files; it must be a folder inside ``run/ckpt``.

    A crafted or corrupted file cannot point attnlab (which may delete old checkpoints) anywhere else.
    """
    if not isinstance(relative, str) or not relative:
        raise CheckpointError(f"{where}: expected a checkpoint path such as 'ckpt/step-0000100', got {relative!r}")
    path = Path(run) / relative
    if not path.resolve().is_relative_to((Path(run) / "ckpt").resolve()) or path.resolve() == (Path(run) / "ckpt").resolve():
        raise CheckpointError(f"{where}: {relative!r} is outside the run's ckpt/ folder")
    return path


def average_checkpoints(directories: list[Path]) -> dict[str, Tensor]:
    """Element-wise mean of the weights of several checkpoints of one model (as the paper does)."""
    if not directories:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, Tensor] = {}
    for directory in directories:
        tensors = _load_tensors(_require(directory, "model.safetensors"))
        if total and tensors.keys() != total.keys():
            raise CheckpointError(f"{directory} holds different tensors from {directories[0]}")
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                total[name] = total.get(name, 0) + tensor.double()
            else:
                total[name] = tensor
    return {
        name: (t / len(directories)).float() if t.is_floating_point() else t for name, t in total.items()
    }


def remove_orphans(run: Path) -> list[Path]:
    """Remove what an interrupted save left in a run: temporary checkpoint folders and files.

    ``save_checkpoint`` builds ``ckpt/.NAME.*.tmp`` and moves a replaced one to ``ckpt/.NAME.old``;
    atomic file writes use ``.NAME.*.tmp``. Call this only while holding the run's lock, so that no
    other process is writing them. Returns what was removed.
    """
    removed = []
    for folder in (Path(run), Path(run) / "ckpt"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.endswith(".old")):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed.append(path)
    return removed
