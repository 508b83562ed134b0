"""Training settings: what every run shares, plus one section for the task it trains.

``TrainConfig`` holds the settings of every task (model width, optimisation, length of the run,
machine) and ``task``, a section with the names that task uses: ``TranslationSettings`` (languages,
vocabulary, encoder and decoder depth, token-based batches) or ``LanguageModelSettings`` (depth,
context, sequences per batch). A setting of the other task is rejected by name, never renamed or
ignored: ``override(context=32)`` on a translation config is an error.

The CLI's flags are generated from these fields (``attnlab.app.cli``), and every checkpoint
stores the ``TrainConfig`` it was made with (``to_dict``/``from_dict``, plain JSON).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, get_type_hints

from ..store.fields import fits

__all__ = [
    "TrainConfig",
    "TranslationSettings",
    "LanguageModelSettings",
    "TASK_SETTINGS",
    "RESUMABLE_FIELDS",
    "setting_names",
]

SCHEDULES = ("noam", "cosine")
DEVICES = ("auto", "cpu", "cuda")

# Settings that a resumed run may change: how long it goes on, and on what. Everything else
# (model shape, vocabulary, data, optimisation) is the run's own.
RESUMABLE_FIELDS = ("epochs", "max_steps", "time_limit", "patience", "eval_every", "save_every", "device", "threads")


def _require(condition: bool, name: str, rule: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"setting {name} must be {rule}, got {value!r}")


def _check_types(settings: Any) -> None:
    """Every field holds a value of its declared type (``store.fields.fits``: bool is not an int
    here, an int is a float), and every float is finite."""
    hints = get_type_hints(type(settings))
    for f in fields(settings):
        if f.name == "task":  # the section's class is checked by TrainConfig itself
            continue
        value = getattr(settings, f.name)
        if not fits(hints[f.name], value):
            raise ValueError(f"setting {f.name} must be {f.type}, got {value!r} ({type(value).__name__})")
        if hints[f.name] is float and not math.isfinite(value):
            raise ValueError(f"setting {f.name} must be a finite number, got {value!r}")


class _Section:
    """What both task sections share: a kind, type checks, JSON round trips."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class TranslationSettings(_Section):
    """Encoder-decoder translation: the corpus, its vocabulary, the depth and the batches."""

    kind: ClassVar[str] = "translation"

    data: str = ""  # a folder made by `attnlab prepare`; empty: the bundled Multi30k of src_lang->tgt_lang
    src_lang: str = "de"  # with data: the prepared data's languages
    tgt_lang: str = "en"
    data_dir: str = ""  # where the Multi30k files are; empty: the bundled corpora (or $ATTNLAB_DATA)
    train_fraction: float = 1.0  # train on the first pairs only (tests use less); the vocabulary is the data's
    vocab_size: int = 8000  # Multi30k's; a prepared dataset brings its own vocabulary
    shared_vocab: bool = True
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    max_len: int = 256  # positions of the model; longer training pairs are left out
    max_tokens: int = 4096  # tokens per side per batch, padding included
    eval_sentences: int = 0  # validation sentences scored by BLEU, 0: all

    def __post_init__(self) -> None:
        _check_types(self)
        _require(0.0 < self.train_fraction <= 1.0, "train_fraction", "in (0, 1]", self.train_fraction)
        for name in ("vocab_size", "num_encoder_layers", "num_decoder_layers", "max_len", "max_tokens"):
            _require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        _require(self.eval_sentences >= 0, "eval_sentences", ">= 0 (0: all)", self.eval_sentences)
        if self.src_lang == self.tgt_lang:
            raise ValueError(f"source and target language are both {self.src_lang!r}")


@dataclass(frozen=True)
class LanguageModelSettings(_Section):
    """Decoder-only language modelling: the text, the depth, the context and the batches."""

    kind: ClassVar[str] = "lm"

    data_dir: str = ""  # empty: the bundled corpora (or $ATTNLAB_DATA)
    num_layers: int = 4
    context: int = 64  # tokens per sequence, the model's positions
    batch_size: int = 12  # sequences per batch

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("num_layers", "context", "batch_size"):
            _require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))


TASK_SETTINGS: dict[str, type[TranslationSettings] | type[LanguageModelSettings]] = {
    "translation": TranslationSettings,
    "lm": LanguageModelSettings,
}
TASK_NAMES = {"translation": "translation", "lm": "language-model"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs to be repeated: the task's section, model width,
    optimisation, the length of the run and the machine."""

    task: TranslationSettings | LanguageModelSettings = field(default_factory=TranslationSettings)
    preset: str = "custom"
    # model (depth is the task's: encoder and decoder layers, or layers)
    d_model: int = 256
    num_heads: int = 8
    d_ff: int = 1024
    dropout: float = 0.1
    norm_first: bool = False
    share_embeddings: bool = True
    # optimisation
    schedule: str = "noam"
    lr: float = 1.0  # noam: the factor before d_model^-0.5 (paper: 1); cosine: the peak rate
    min_lr: float = 1e-4  # cosine: the final rate
    warmup: int = 4000
    label_smoothing: float = 0.1
    clip_norm: float = 1.0  # 0: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    # length of the run
    epochs: int = 100
    max_steps: int = 0  # 0: no limit
    time_limit: float = 0.0  # minutes of training, evaluations included; 0: no limit
    eval_every: int = 0  # steps between evaluations; 0: once per epoch
    save_every: int = 0  # steps between resumable checkpoints without evaluation (ckpt/latest); 0: none
    patience: int = 0  # evaluations without improvement before stopping early, 0: never
    keep_last: int = 5  # checkpoints kept for averaging
    average_last: int = 5  # checkpoints averaged at the end, 0/1: none
    # machine
    seed: int = 1
    device: str = "auto"  # auto, cpu, cuda
    threads: int = 0  # 0: all cores (per process)
    amp: bool = True  # bf16 autocast on CUDA; ignored on the CPU

    def __post_init__(self) -> None:
        if not isinstance(self.task, tuple(TASK_SETTINGS.values())):
            raise ValueError(f"task must be TranslationSettings or LanguageModelSettings, got {self.task!r}")
        _check_types(self)
        _require(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule)
        _require(self.device in DEVICES, "device", f"one of {DEVICES}", self.device)
        for name in ("d_model", "num_heads", "d_ff", "warmup", "epochs", "keep_last"):
            _require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        _require(self.d_model % self.num_heads == 0, "d_model", f"divisible by num_heads={self.num_heads}",
                 self.d_model)
        for name in ("max_steps", "time_limit", "eval_every", "save_every", "patience", "average_last", "threads",
                     "weight_decay", "clip_norm", "min_lr"):
            _require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _require(self.lr > 0, "lr", "> 0", self.lr)
        _require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)", self.dropout)
        _require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "in [0, 1)", self.label_smoothing)
        for name in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "in [0, 1)", getattr(self, name))
        _require(self.adam_eps > 0, "adam_eps", "> 0", self.adam_eps)
        _require(0 <= self.seed < 2**63, "seed", "in [0, 2**63)", self.seed)
        if self.schedule == "cosine" and self.max_steps < 1:
            raise ValueError("the cosine schedule decays over max_steps: set max_steps (its length)")

    @property
    def kind(self) -> str:
        """The task's name: "translation" or "lm"."""
        return self.task.kind

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task"}
        return {"task": self.task.to_dict(), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "training settings") -> "TrainConfig":
        """Rebuild a config from ``to_dict``'s output; ``source`` names the file in error messages."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected an object of settings, got {type(data).__name__}")
        section = data.get("task")
        if isinstance(section, str):
            raise ValueError(f"{source}: these settings were written by an attnlab before 0.2 (one flat list); "
                             "its model still loads for translation and generation, but the run cannot be resumed")
        if not isinstance(section, dict) or section.get("kind") not in TASK_SETTINGS:
            raise ValueError(f"{source}: 'task' must be an object whose 'kind' is one of {sorted(TASK_SETTINGS)}")
        settings_class = TASK_SETTINGS[section["kind"]]
        task_values = {k: v for k, v in section.items() if k != "kind"}
        _reject_unknown(task_values, {f.name for f in fields(settings_class)}, f"{source}: task ({section['kind']})")
        common = {k: v for k, v in data.items() if k != "task"}
        _reject_unknown(common, {f.name for f in fields(cls)} - {"task"}, source)
        return cls(task=settings_class(**task_values), **common)

    def override(self, **changes: Any) -> "TrainConfig":
        """A copy with some settings changed, common or the task's (validated again).

        A setting that belongs to the other task is an error that says which task it belongs to.
        """
        own = {f.name for f in fields(self.task)}
        common = {f.name for f in fields(self)} - {"task"}
        task_changes = {k: v for k, v in changes.items() if k in own}
        for name in changes:
            if name in own or name in common:
                continue
            owners = [kind for kind, section in TASK_SETTINGS.items() if name in {f.name for f in fields(section)}]
            if owners:
                raise ValueError(f"setting {name} belongs to {' and '.join(TASK_NAMES[k] for k in owners)} training, "
                                 f"not to this {TASK_NAMES[self.kind]} run")
            raise ValueError(f"unknown training setting {name!r}")
        rest = {k: v for k, v in changes.items() if k not in own}
        return replace(self, task=replace(self.task, **task_changes), **rest)

    @classmethod
    def for_task(cls, kind: str, **settings: Any) -> "TrainConfig":
        """A config of task ``kind`` ("translation" or "lm") with any settings, common or the task's."""
        if kind not in TASK_SETTINGS:
            raise ValueError(f"unknown task {kind!r}; choose one of {sorted(TASK_SETTINGS)}")
        return cls(task=TASK_SETTINGS[kind]()).override(**settings)


def _reject_unknown(values: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}")


def setting_names(kind: str | None = None) -> list[str]:
    """The names of all settings (common first), or of those that apply to task ``kind``."""
    common = [f.name for f in fields(TrainConfig) if f.name != "task"]
    kinds = TASK_SETTINGS if kind is None else {kind: TASK_SETTINGS[kind]}
    task = [f.name for section in kinds.values() for f in fields(section)]
    return common + list(dict.fromkeys(n for n in task if n not in common))
