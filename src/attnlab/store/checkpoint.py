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

from .files import write_text_atomic

__all__ = [
    "CheckpointError",
    "write_json_atomic",
    "save_checkpoint",
    "load_model_state",
    "read_checkpoint_json",
    "load_trainer_state",
    "resolve_checkpoint",
    "average_checkpoints",
]

POINTER = "checkpoints.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or not an attnlab checkpoint."""


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
        save_file(_unique_state(model), str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "config.json", config)
        write_json_atomic(tmp / "vocab.json", vocab)
        if trainer_tensors is not None:
            save_file({k: v.contiguous().cpu() for k, v in trainer_tensors.items()},
                      str(tmp / "trainer.safetensors"))
        if trainer_info is not None:
            write_json_atomic(tmp / "trainer.json", trainer_info)
        if directory.exists():  # replacing: move the old one aside first, then drop it
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _require(directory: Path, name: str) -> Path:
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete attnlab checkpoint: {name} is missing")
    return path


def read_checkpoint_json(directory: Path, name: str) -> Any:
    """Read ``config.json``, ``vocab.json`` or ``trainer.json`` of a checkpoint."""
    with open(_require(directory, name), encoding="utf-8") as f:
        return json.load(f)


def load_model_state(model: nn.Module, directory: Path, map_location: str | torch.device = "cpu") -> None:
    """Load weights saved by ``save_checkpoint`` into ``model`` (tied weights are restored by tying)."""
    tensors = load_file(str(_require(directory, "model.safetensors")), device=str(map_location))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
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
    tensors = load_file(str(_require(directory, "trainer.safetensors")))
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
    with open(pointer, encoding="utf-8") as f:
        entries = json.load(f)
    order = {"model": ("model", "best", "last"), "best": ("best",), "last": ("last",)}[which]
    for key in order:
        if entries.get(key):
            return path / entries[key]
    raise CheckpointError(f"{pointer} names no '{which}' checkpoint")


def average_checkpoints(directories: list[Path]) -> dict[str, Tensor]:
    """Element-wise mean of the weights of several checkpoints of one model (as the paper does)."""
    if not directories:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, Tensor] = {}
    for directory in directories:
        tensors = load_file(str(_require(directory, "model.safetensors")))
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
