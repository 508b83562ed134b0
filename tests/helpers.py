"""Shared test helpers: printed-digit checks, mask conversion, and weight copying to PyTorch modules.

attnlab masks are boolean with True = may attend; ``torch.nn.MultiheadAttention`` and the
``torch.nn.Transformer*`` layers take boolean masks with True = blocked. The conversion lives here,
once, and the tests call it at the edge.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from attnlab import (
    DecoderLayer,
    EncoderLayer,
    MultiHeadAttention,
    Transformer,
    TransformerConfig,
)
from attnlab.nn.model import DecoderOnlyTransformer, LanguageModelConfig
from attnlab.train.config import TrainConfig
from attnlab.train.presets import get_preset


def tiny_transformer(seed: int = 0, *, vocab: int = 40, train: bool = False, **overrides) -> Transformer:
    """The one small encoder-decoder the tests share: seeded weights, dropout 0, evaluation mode.

    ``vocab`` sets both vocabulary sizes; any ``TransformerConfig`` field can be overridden.
    """
    settings = dict(src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=16, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2, d_ff=32, dropout=0.0, max_len=64)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(**settings))
    return model.train(train)


def tiny_language_model(seed: int = 0, *, vocab: int = 30, train: bool = False, **overrides) -> DecoderOnlyTransformer:
    """The one small decoder-only model the tests share (seeded, dropout 0, evaluation mode)."""
    settings = dict(vocab_size=vocab, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=16, dropout=0.0)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = DecoderOnlyTransformer(LanguageModelConfig(**settings))
    return model.train(train)


def leaves(*shapes: tuple[int, ...], seed: int = 1, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Random tensors of the given shapes that collect gradients (a seeded generator of their own)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=dtype, generator=generator).requires_grad_() for shape in shapes]


def clones(*tensors: Tensor) -> list[Tensor]:
    """Fresh leaf copies of ``tensors``, for feeding the same values to a second implementation."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def backward_both(out: Tensor, their_out: Tensor) -> None:
    """Backpropagate one random upstream gradient through both outputs."""
    grad = torch.randn_like(out)
    out.backward(grad)
    their_out.backward(grad)


def assert_digits(actual: Tensor, expected, decimals: int) -> None:
    """``actual`` rounded to ``decimals`` digits equals the printed ``expected`` digit for digit."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = 10.0**decimals
    got = torch.round(actual.detach().double() * scale).long()
    want = torch.round(expected * scale).long()
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got, want), f"\n{got / scale}\n!=\n{want / scale}"


# -- masks: attnlab (True = may attend) -> PyTorch modules (True = blocked) -------------------------
def torch_key_padding_mask(mask: Tensor) -> Tensor:
    """attnlab padding mask (B, 1, 1, S) -> PyTorch ``key_padding_mask`` (B, S), True = padding."""
    return ~mask[:, 0, 0, :]


def torch_attn_mask(mask: Tensor) -> Tensor:
    """attnlab (T, S) mask -> PyTorch ``attn_mask`` (T, S), True = blocked."""
    return ~mask


# -- our modules' parameters, named and packed the way PyTorch's counterparts hold them --------------
def _mha_state(mha: MultiHeadAttention, get: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    return {
        "in_proj_weight": get(mha.in_proj_weight),
        "in_proj_bias": get(mha.in_proj_bias),
        "out_proj.weight": get(mha.w_o.weight),
        "out_proj.bias": get(mha.w_o.bias),
    }


def torch_state(module: nn.Module, grads: bool = False) -> dict[str, Tensor]:
    """Parameters (or their gradients) of an attnlab ``MultiHeadAttention``, ``EncoderLayer`` or
    ``DecoderLayer`` under the names of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerDecoderLayer``: load them with ``load_state_dict``, or compare gradients."""
    get = (lambda p: p.grad) if grads else (lambda p: p.detach())
    if isinstance(module, MultiHeadAttention):
        return _mha_state(module, get)
    if not isinstance(module, (EncoderLayer, DecoderLayer)):
        raise TypeError(f"no PyTorch counterpart known for {type(module).__name__}")
    state = {f"self_attn.{k}": v for k, v in _mha_state(module.self_attn, get).items()}
    if isinstance(module, DecoderLayer):
        state.update({f"multihead_attn.{k}": v for k, v in _mha_state(module.cross_attn, get).items()})
    ff = module.feed_forward
    state.update({
        "linear1.weight": get(ff.w_1.weight), "linear1.bias": get(ff.w_1.bias),
        "linear2.weight": get(ff.w_2.weight), "linear2.bias": get(ff.w_2.bias),
    })
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm):
            state[f"{name}.weight"] = get(child.weight)
            state[f"{name}.bias"] = get(child.bias)
    return state


def copy_to_torch(ours: nn.Module, theirs: nn.Module) -> nn.Module:
    """Load ``ours``'s weights into its PyTorch counterpart (strictly: every parameter mapped)."""
    theirs.load_state_dict(torch_state(ours), strict=True)
    return theirs


def assert_grads_match(ours: nn.Module, theirs: nn.Module, **tolerances) -> None:
    """Every parameter gradient of ``theirs`` equals the corresponding one of ``ours``."""
    mapped = torch_state(ours, grads=True)
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(mapped[name], p.grad, msg=lambda m: f"grad of {name}: {m}", **tolerances)


def randomize_norms_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every LayerNorm a non-trivial γ and β, so that tests notice if either is dropped."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=generator))
    return module


# -- small training runs ----------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]

# The "tiny" preset shrunk to seconds: 1% of Multi30k (111 pairs within max_len 64 once the
# 300-token vocabulary has split them), 18 batches an epoch, a 32k-parameter model.
SMALL = dict(
    train_fraction=0.01, vocab_size=300, d_model=32, num_heads=2, num_encoder_layers=1,
    num_decoder_layers=1, d_ff=64, dropout=0.1, max_len=64, max_tokens=400, lr=0.5, warmup=10,
    eval_sentences=10, time_limit=0.0, epochs=100, keep_last=3, average_last=0, threads=1,
)


def small_config(**changes) -> TrainConfig:
    """The ``tiny`` preset shrunk to a run of seconds, with ``changes``."""
    return get_preset("tiny").override(**{**SMALL, **changes})


def flat_settings(config: TrainConfig) -> dict:
    """Every setting by name, the task's and the common ones, as the command line sees them."""
    data = config.to_dict()
    return {**{k: v for k, v in data.pop("task").items() if k != "kind"}, **data}


def cli_flags(config: TrainConfig) -> list[str]:
    """``attnlab train`` flags that turn the preset into ``config``."""
    preset = flat_settings(get_preset(config.preset))
    flags = []
    for name, value in flat_settings(config).items():
        if name != "preset" and value != preset[name]:
            flags += [f"--{name.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def quiet(_message: str) -> None:
    """An ``echo`` for training that prints nothing."""


def subprocess_env() -> dict[str, str]:
    """The environment for an attnlab child process: this checkout's source, no torchrun variables."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def cli(argv: list, capsys) -> tuple[int, str, str]:
    """Run ``attnlab argv`` in this process: (exit code, stdout, stderr)."""
    from attnlab.app.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err
