"""Training settings as one frozen dataclass; the CLI's flags are generated from its fields.

Every checkpoint stores the ``TrainConfig`` it was made with (see ``attnlab.checkpoint``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["TrainConfig"]

TASKS = ("translation", "lm")
SCHEDULES = ("noam", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs to be repeated: data, model size, optimisation, stopping."""

    preset: str = "custom"
    task: str = "translation"  # "translation" (encoder-decoder) or "lm" (decoder-only)
    # data
    src_lang: str = "de"
    tgt_lang: str = "en"
    data_dir: str = ""  # empty: the project's data/ folder (or $ATTNLAB_DATA)
    train_fraction: float = 1.0  # use a prefix of the training data (the demo and tests use less)
    vocab_size: int = 8000
    shared_vocab: bool = True
    # model
    d_model: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1
    norm_first: bool = False
    share_embeddings: bool = True
    max_len: int = 256
    # batches
    max_tokens: int = 4096  # translation: tokens per side per batch, padding included
    batch_size: int = 12  # lm: sequences per batch
    context: int = 64  # lm: tokens per sequence
    # optimisation
    schedule: str = "noam"
    lr: float = 1.0  # noam: the factor before d_model^-0.5 (paper: 1); cosine: the peak rate
    min_lr: float = 1e-4  # cosine: the final rate
    warmup: int = 4000
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    # length of the run
    epochs: int = 100
    max_steps: int = 0  # 0: no limit
    time_limit: float = 0.0  # minutes of training, 0: no limit
    eval_every: int = 0  # steps between evaluations; 0: once per epoch
    eval_sentences: int = 0  # translation: validation sentences scored by BLEU, 0: all
    patience: int = 0  # evaluations without improvement before stopping early, 0: never
    keep_last: int = 5  # checkpoints kept for averaging
    average_last: int = 5  # checkpoints averaged at the end, 0/1: none
    # machine
    seed: int = 1
    device: str = "auto"  # auto, cpu, cuda
    threads: int = 0  # 0: all cores (per process)
    amp: bool = True  # bf16 autocast on CUDA; ignored on the CPU

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        for name in ("max_tokens", "batch_size", "context", "vocab_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.schedule == "cosine" and self.max_steps < 1:
            raise ValueError("the cosine schedule decays over max_steps: set max_steps (its length)")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 step, got {self.warmup}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.task == "translation" and self.src_lang == self.tgt_lang:
            raise ValueError(f"source and target language are both {self.src_lang!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return cls(**data)

    def override(self, **changes: Any) -> "TrainConfig":
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)
