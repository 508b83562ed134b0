"""attnlab's compiled kernels, for the two places where a pass in C beats a sequence of PyTorch calls.

- Training: multi-head self-attention over short sequences (``csrc/short_attention.c``), forward
  and backward, the compiled form of ``attention._ShortSelfAttention``. It reads the fused
  projection where it lies and writes the results where the next layer wants them: no reordering of
  Q, K, V into heads and back, and no per-matrix overhead of batched products of 24 x 32 matrices.
- Decoding: beam search's scoring step (``csrc/beam_scores.c``): log-softmax, beam scores and the
  best 2K extensions per sentence in one pass over the logits, instead of three; greedy search's
  choice, the best token that is not banned, in one pass (``attnlab_greedy_pick``), or from the output
  layer's int8 product, computing in float32 only the few tokens its error bound leaves in contention
  (``attnlab_screened_pick``, for ``fast_decode.screened_pick``); int8 translators' products, and
  their output layer with greedy search's choice made as its logits are formed
  (``csrc/int8_output.c``, for ``fast_decode``'s int8 weights and ``int8_pick``); and the decoder
  step's two attentions (``csrc/decode_attention.c``), one query per row, reading each step's keys
  and values where its projection wrote them and following the rows' moves between steps, so that
  the cache is never copied, gathered or grown (``attnlab.nn.fast_decode``).

``benchmarks/bench_core.py`` and ``benchmarks/bench_translate.py`` measure what they gain.

They are built on first use with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``), for this machine's CPU (``-march=native``), in under a second, into one library kept in
attnlab's cache folder (``<cache>/native``: ``$ATTNLAB_CACHE``, else ``~/.cache/attnlab`` on Linux)
under a name that changes with the sources, the compiler and the CPU, so that a change to any of
them builds afresh. Where no compiler is found, or ``ATTNLAB_NATIVE=0`` is set, or the build fails
(with a warning that quotes the compiler's error; the failure is remembered in the cache, and
deleting ``<cache>/native`` tries again), attnlab runs the same maths with PyTorch's operations
instead: the same numbers to float32 rounding, somewhat slower (int8 excepted: there PyTorch's int8
product runs, whose quantization differs). Nothing else needs a compiler.

Built with OpenMP, the kernels run with ``torch.get_num_threads()`` threads on the OpenMP runtime
PyTorch has loaded, where that is GNU's (the dynamic loader finds a library of that name already in
the process; PyTorch's Linux wheels ship it); elsewhere on a second runtime. A compiler without
OpenMP gives one-thread kernels, with a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab.folders import cache_dir

__all__ = [
    "ShortAttentionKernel", "BeamScoresKernel", "GreedyPickKernel", "DecoderAttentionKernel", "Int8OutputKernel",
    "short_attention_kernel", "beam_scores_kernel", "greedy_pick_kernel", "decoder_attention_kernel",
    "int8_output_kernel",
    "kernel_takes", "short_attention_for",
    "MAX_LEN", "MAX_HEAD_DIM", "MAX_BEAM_CANDIDATES", "MAX_DECODE_POSITIONS", "MAX_INT8_INPUTS",
]

SOURCES = Path(__file__).with_name("csrc")  # the C files, built together into one library
MAX_LEN = 64  # the attention kernel's limits (MAX_T, MAX_D and D % 8 in short_attention.c)
MAX_HEAD_DIM = 256
MAX_BEAM_CANDIDATES = 64  # MAX_N in beam_scores.c
MAX_DECODE_POSITIONS = 4096  # MAX_POSITIONS in decode_attention.c: target steps, source positions
MAX_INT8_INPUTS = 16384  # MAX_E in int8_output.c: its integer sums stay within 32 bits
_BUILD_TIMEOUT_S = 120
# Tried in order: with OpenMP, then without (one thread). Both for this CPU's own instructions:
# built for a generic x86-64 the kernel was 4x slower, slower than PyTorch's operations. GCC turns
# the kernel's short row copies into calls of memcpy unless told not to (clang ignores the flag).
_FLAG_SETS = (
    ("-O3", "-march=native", "-fno-tree-loop-distribute-patterns", "-fopenmp"),
    ("-O3", "-march=native", "-fno-tree-loop-distribute-patterns"),
)
_lock = threading.Lock()


def kernel_takes(qkv: Tensor, head_dim: int, mask: Tensor | None) -> bool:
    """Whether the kernel computes this self-attention: float32 on the CPU, T <= 64, a head
    dimension that is a multiple of 8 (whole registers) up to 256, a boolean mask or none."""
    return (
        qkv.dtype == torch.float32
        and qkv.device.type == "cpu"
        and qkv.size(0) > 0
        and 0 < qkv.size(1) <= MAX_LEN
        and 0 < head_dim <= MAX_HEAD_DIM
        and head_dim % 8 == 0
        and (mask is None or mask.dtype == torch.bool)
    )


def short_attention_for(qkv: Tensor, head_dim: int, mask: Tensor | None) -> "ShortAttentionKernel | None":
    """The attention kernel where it computes this self-attention (``kernel_takes``) and could be
    built; None otherwise."""
    return short_attention_kernel() if kernel_takes(qkv, head_dim, mask) else None


class ShortAttentionKernel:
    """The attention kernel, called with tensors. ``forward`` returns the softmax weights (kept for
    the backward pass, (B·H, T, T8) with T8 = T rounded up to a multiple of 8, zero beyond T) and
    the heads' outputs merged, (B, T, E); ``backward`` returns the gradient of ``qkv``."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        pointer, integer, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._forward = library.attnlab_short_attention_forward
        self._forward.argtypes = [pointer, pointer, pointer, pointer, integer, integer, integer, integer,
                                  real, pointer, pointer, integer]
        self._forward.restype = integer
        self._backward = library.attnlab_short_attention_backward
        self._backward.argtypes = [pointer, pointer, pointer, pointer, integer, integer, integer, integer,
                                   real, pointer, integer]
        self._backward.restype = integer

    def forward(self, qkv: Tensor, num_heads: int, mask: Tensor | None, scale: float,
                kept: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T, E3 = qkv.shape
        H, D = num_heads, E3 // (3 * num_heads)
        weights = qkv.new_empty(B * H, T, -(-T // 8) * 8)
        out = qkv.new_empty(B, T, H * D)
        mask_pointer, strides = None, None
        if mask is not None:
            mask = mask.expand(B, H, T, T)  # a view: broadcast dimensions get stride 0
            mask_pointer, strides = mask.data_ptr(), (ctypes.c_int64 * 4)(*mask.stride())
        _check(self._forward(qkv.data_ptr(), mask_pointer, strides, _pointer(kept), B, T, H, D, scale,
                             weights.data_ptr(), out.data_ptr(), torch.get_num_threads()), B, T, H, D)
        return weights, out

    def backward(self, qkv: Tensor, weights: Tensor, kept: Tensor | None, grad_out: Tensor,
                 num_heads: int, scale: float) -> Tensor:
        B, T, E3 = qkv.shape
        H, D = num_heads, E3 // (3 * num_heads)
        grad_out = grad_out.contiguous()
        grad_qkv = torch.empty_like(qkv)
        _check(self._backward(qkv.data_ptr(), weights.data_ptr(), _pointer(kept), grad_out.data_ptr(),
                              B, T, H, D, scale, grad_qkv.data_ptr(), torch.get_num_threads()), B, T, H, D)
        return grad_qkv


class BeamScoresKernel:
    """Beam search's scoring step: ``top(logits, alive, n, banned)`` for logits (S·R, V) of S
    sentences with R live beams each and beam scores ``alive`` (S, K), K >= R, returns the n best
    ``alive + log_softmax(logits)`` candidates of each sentence, best first, not counting the
    ``banned`` token ids: values (S, n) and indices (S, n) into each sentence's R·V candidates."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._top = library.attnlab_beam_scores
        self._top.argtypes = [pointer, pointer, integer, integer, integer, integer, integer, pointer, integer,
                              pointer, pointer, integer]
        self._top.restype = integer

    def top(self, logits: Tensor, alive: Tensor, n: int, banned: Tensor) -> tuple[Tensor, Tensor]:
        S, K = alive.shape
        R, V = logits.size(0) // max(S, 1), logits.size(1)
        _check_cpu(("logits", logits, torch.float32), ("alive", alive, torch.float32), ("banned", banned, torch.int64))
        if logits.dim() != 2 or logits.size(0) != S * R or not 1 <= R <= K:
            raise ValueError(f"logits must be (S·R, V) for S={S} sentences and 1 <= R <= K={K}, "
                             f"got {tuple(logits.shape)}")
        logits, alive, banned = logits.contiguous(), alive.contiguous(), banned.contiguous()
        values = logits.new_empty(S, n)
        indices = torch.empty(S, n, dtype=torch.int64)
        status = self._top(logits.data_ptr(), alive.data_ptr(), S, R, K, V, n, banned.data_ptr(), banned.numel(),
                           values.data_ptr(), indices.data_ptr(), torch.get_num_threads())
        if status != 0:  # beam_search keeps other shapes away: this is a bug of attnlab's
            raise RuntimeError(f"attnlab's beam-scoring kernel refused S={S} R={R} K={K} V={V} n={n}")
        return values, indices


class GreedyPickKernel:
    """Greedy search's choice: ``pick(scores, banned)`` for scores (N, V) returns (N,) int64, each
    row's position of its largest score that is not a ``banned`` id: what ``argmax`` gives with the
    banned ids at -inf (the first of equal largest; a NaN first, as ``argmax`` ranks it), except in a
    row whose allowed scores are all -inf, where it gives the first allowed id (``argmax``: 0).

    ``screened(approx, hidden, rows, bias, l1, error, half_step, slack, banned)``: the same choice over
    the float32 logits ``bias + hidden @ rows.T`` (N, V), from ``approx``, the int8 approximation of
    those logits, within the error bound described in ``csrc/beam_scores.c``
    (``attnlab_screened_pick``), ``half_step`` one for all rows or one per row; only the tokens that
    bound leaves in contention are computed in float32. ``approx`` is overwritten. None where a row
    holds a NaN or an infinity: the caller then computes the logits in float32 and picks from them."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        pointer, integer, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._pick = library.attnlab_greedy_pick
        self._pick.argtypes = [pointer, ctypes.c_int64, integer, pointer, integer, pointer, integer]
        self._pick.restype = integer
        self._screened = library.attnlab_screened_pick
        self._screened.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, pointer, real, ctypes.c_int64,
                                   integer, integer, pointer, integer, pointer, integer]
        self._screened.restype = integer

    def screened(self, approx: Tensor, hidden: Tensor, rows: Tensor, bias: Tensor, l1: Tensor, error: Tensor,
                 half_step: float | Tensor, slack: float, banned: Tensor) -> Tensor | None:
        N, E = hidden.shape
        V = rows.size(0)
        if not isinstance(half_step, Tensor):
            half_step = torch.full((N,), half_step)
        _check_cpu(*((name, tensor, torch.float32) for name, tensor in (
            ("approx", approx), ("hidden", hidden), ("rows", rows), ("bias", bias), ("l1", l1), ("error", error),
            ("half_step", half_step))), ("banned", banned, torch.int64))
        if half_step.shape != (N,):
            raise ValueError(f"screened: half_step must be a number or one per row, (N,) = ({N},), "
                             f"got {tuple(half_step.shape)}")
        if approx.shape != (N, V) or rows.shape != (V, E) or any(t.shape != (V,) for t in (bias, l1, error)):
            raise ValueError(f"screened: approx {tuple(approx.shape)}, hidden {tuple(hidden.shape)} and rows "
                             f"{tuple(rows.shape)} do not make (N, V), (N, E) and (V, E)")
        if not (approx.is_contiguous() and rows.is_contiguous()):
            raise ValueError("screened: approx and rows must be contiguous")
        hidden, bias, l1, error, half_step, banned = (t.contiguous() for t in (hidden, bias, l1, error, half_step,
                                                                                  banned))
        out = torch.empty(N, dtype=torch.int64)
        status = self._screened(approx.data_ptr(), hidden.data_ptr(), rows.data_ptr(), bias.data_ptr(), l1.data_ptr(),
                                error.data_ptr(), half_step.data_ptr(), slack, N, V, E, banned.data_ptr(), banned.numel(),
                                out.data_ptr(), torch.get_num_threads())
        if status < 0:
            raise RuntimeError(f"attnlab's screened-pick kernel refused N={N} V={V} E={E}")
        return None if status else out

    def pick(self, scores: Tensor, banned: Tensor) -> Tensor:
        _check_cpu(("scores", scores, torch.float32), ("banned", banned, torch.int64))
        if scores.dim() != 2 or scores.size(1) < 1:
            raise ValueError(f"scores must be (N, V) with V >= 1, got {tuple(scores.shape)}")
        scores, banned = scores.contiguous(), banned.contiguous()
        out = torch.empty(scores.size(0), dtype=torch.int64)
        if self._pick(scores.data_ptr(), scores.size(0), scores.size(1), banned.data_ptr(), banned.numel(),
                      out.data_ptr(), torch.get_num_threads()) != 0:
            raise RuntimeError(f"attnlab's greedy-pick kernel refused the shape {tuple(scores.shape)}")
        return out


class Int8OutputKernel:
    """attnlab's int8 products (``csrc/int8_output.c``) on weights quantized and packed by
    ``fast_decode.int8_weights`` (an ``Int8Weights``, which ``check`` holds to the kernel's layout):
    ``linear(x, table)`` returns x Wᵀ + b (N, out) for rows x (N, in); ``pick(hidden, table, banned)``
    returns each row's largest output that is not a ``banned`` id (int64; ids outside the outputs are
    passed over), (N,) int64, the first of equals (greedy search's choice), and with ``logits=True``
    the outputs too. Both return None where a row holds a NaN or an infinity or a range beyond
    float32's (or every output is banned): the caller then computes the whole call in float32. They
    check the rows they are given, not the table."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._run = library.attnlab_int8_output
        self._run.argtypes = [pointer, ctypes.c_int64, integer, pointer, pointer, pointer, pointer, pointer, integer,
                              integer, pointer, pointer, integer]
        self._run.restype = integer

    @staticmethod
    def check(table: Any) -> None:
        """One line where ``table`` is not laid out as the kernel reads it."""
        V, E = table.out_features, table.in_features
        if not 1 <= E <= MAX_INT8_INPUTS or V < 1:
            raise ValueError(f"int8 kernel: layers of 1 to {MAX_INT8_INPUTS} inputs and 1 output or more, got "
                             f"{E} x {V}")
        vectors = [("scale", table.scale), ("colsum", table.colsum), ("bias", table.bias)]
        _check_cpu(("weights", table.weights, torch.int8), ("colsum", table.colsum, torch.int32),
                   *((name, t, torch.float32) for name, t in vectors if name != "colsum"))
        V16, E4 = -(-V // 16) * 16, -(-E // 4) * 4
        if table.weights.shape != (V16 // 16, E4 // 4, 16, 4) or any(t.shape != (V16,) for _, t in vectors):
            raise ValueError(f"int8 kernel: weights {tuple(table.weights.shape)} and vectors {tuple(table.scale.shape)} "
                             f"are not a layer of {V} outputs for rows of {E}")
        if not all(t.is_contiguous() for t in (table.weights, *(t for _, t in vectors))):
            raise ValueError("int8 kernel: the packed weights and vectors must be contiguous")

    def linear(self, x: Tensor, table: Any) -> Tensor | None:
        x = self._rows(x, table)
        outputs = torch.empty(x.size(0), table.out_features, dtype=torch.float32)
        if x.size(0) == 0:
            return outputs
        return None if self._call(x, table, None, outputs, None) else outputs

    def pick(self, hidden: Tensor, table: Any, banned: Tensor,
             logits: bool = False) -> tuple[Tensor, Tensor | None] | None:
        hidden = self._rows(hidden, table)
        _check_cpu(("banned", banned, torch.int64))
        chosen = torch.empty(hidden.size(0), dtype=torch.int64)
        outputs = torch.empty(hidden.size(0), table.out_features, dtype=torch.float32) if logits else None
        if hidden.size(0) == 0:
            return chosen, outputs
        return None if self._call(hidden, table, banned.contiguous(), outputs, chosen) else (chosen, outputs)

    @staticmethod
    def _rows(x: Tensor, table: Any) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.size(1) != table.in_features:
            raise ValueError(f"int8 kernel: rows must be CPU float32 (N, {table.in_features}), got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        return x.contiguous()

    def _call(self, x: Tensor, table: Any, banned: Tensor | None, outputs: Tensor | None,
              chosen: Tensor | None) -> bool:
        status = self._run(x.data_ptr(), x.size(0), table.in_features, table.weights.data_ptr(),
                           table.scale.data_ptr(), table.colsum.data_ptr(), table.bias.data_ptr(),
                           _pointer(banned), 0 if banned is None else banned.numel(),
                           table.out_features, _pointer(outputs), _pointer(chosen), torch.get_num_threads())
        if status == -2:
            raise MemoryError("attnlab's int8 kernel could not allocate its workspace")
        if status < 0:  # check and _rows keep other shapes away: this is a bug of attnlab's
            raise RuntimeError(f"attnlab's int8 kernel refused N={x.size(0)} E={table.in_features} "
                               f"V={table.out_features}")
        return bool(status)


class DecoderAttentionKernel:
    """The decoder step's attentions, one query per row (``csrc/decode_attention.c``); the caller
    (``fast_decode``) holds the tensors behind every address it passes alive during the call.

    ``self_attention(steps, parents, N, H, D, scale)``: ``steps`` the addresses of each step's fused
    projection (N_p, 3E), oldest first, the newest holding the queries; ``parents`` per step the
    address of its (N_p,) int64 map to the rows of the step before, or 0 where the rows stayed as
    they were. ``cross_attention(memory, offsets, sources, q, H, scale)``: ``memory`` (P, 2E) the keys
    and values of the source positions to attend to, source b's in rows ``offsets[b]`` to
    ``offsets[b + 1]`` (int64, (Bs + 1,)), ``sources`` (N,) int64 or None (row r reads source r),
    queries ``q`` (N, E). Both return (N, E). The caller keeps every index within its tensor: the
    kernel reads what they name."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        pointer, integer, real, wide = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
        self._self = library.attnlab_decoder_self_attention
        self._self.argtypes = [pointer, pointer, integer, integer, integer, integer, real, pointer, integer]
        self._self.restype = integer
        self._cross = library.attnlab_decoder_cross_attention
        self._cross.argtypes = [pointer, pointer, pointer, integer, integer, integer, pointer, wide, real, pointer,
                                integer]
        self._cross.restype = integer

    def self_attention(self, steps: tuple[int, ...], parents: tuple[int, ...], N: int, H: int, D: int,
                       scale: float) -> Tensor:
        t1 = len(steps)
        out = torch.empty(N, H * D, dtype=torch.float32)
        status = self._self((ctypes.c_void_p * t1)(*steps), (ctypes.c_void_p * t1)(*parents), t1, N, H, D, scale,
                            out.data_ptr(), torch.get_num_threads())
        if status != 0:  # fast_decode keeps other shapes away: this is a bug of attnlab's
            raise RuntimeError(f"attnlab's decoder self-attention kernel refused t={t1} N={N} H={H} D={D}")
        return out

    def cross_attention(self, memory: Tensor, offsets: Tensor, sources: Tensor | None, q: Tensor, H: int,
                        scale: float) -> Tensor:
        N, E = q.shape
        contiguous = memory.is_contiguous() and offsets.is_contiguous() and q.stride(1) == 1
        if not contiguous or memory.dim() != 2 or memory.size(1) != 2 * E or offsets.dtype != torch.int64:
            raise ValueError(f"cross_attention takes contiguous memory (P, 2E), int64 offsets (Bs + 1,) and rows of q "
                             f"(N, E), got {tuple(memory.shape)}, {offsets.dtype} {tuple(offsets.shape)} and "
                             f"{tuple(q.shape)}")
        out = q.new_empty(N, E)
        status = self._cross(memory.data_ptr(), offsets.data_ptr(), _pointer(sources), N, H, E // H, q.data_ptr(),
                             q.stride(0), scale, out.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"attnlab's decoder cross-attention kernel refused N={N} H={H} E={E} (a source with "
                               f"no position, or more than {MAX_DECODE_POSITIONS})")
        return out


def _check_cpu(*tensors: tuple[str, Tensor, torch.dtype]) -> None:
    """Each (name, tensor, dtype) a CPU tensor of that dtype, as the kernels read them; one line otherwise."""
    for name, tensor, dtype in tensors:
        if tensor.device.type != "cpu" or tensor.dtype != dtype:
            raise ValueError(f"{name} must be a CPU {dtype} tensor, got {tensor.dtype} on {tensor.device}")


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _check(status: int, B: int, T: int, H: int, D: int) -> None:
    if status == -2:
        raise MemoryError("attnlab's attention kernel could not allocate its workspace")
    if status != 0:  # kernel_takes keeps other shapes away: this is a bug of attnlab's
        raise RuntimeError(f"attnlab's attention kernel refused the shape B={B} T={T} H={H} D={D}")


class _Kernels:
    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.attention = ShortAttentionKernel(library, path)
        self.beam_scores = BeamScoresKernel(library, path)
        self.decoder_attention = DecoderAttentionKernel(library, path)
        self.greedy_pick = GreedyPickKernel(library, path)
        self.int8_output = Int8OutputKernel(library, path)


def short_attention_kernel() -> ShortAttentionKernel | None:
    """The attention kernel (built on the first call of the process, or found in the cache); None
    where the kernels are switched off (``ATTNLAB_NATIVE=0``), no C compiler is found, or building
    them failed."""
    kernels = _kernels()
    return None if kernels is None else kernels.attention


def beam_scores_kernel() -> BeamScoresKernel | None:
    """The beam-scoring kernel; None where ``short_attention_kernel`` is None."""
    kernels = _kernels()
    return None if kernels is None else kernels.beam_scores


def greedy_pick_kernel() -> GreedyPickKernel | None:
    """Greedy search's choosing kernel; None where ``short_attention_kernel`` is None."""
    kernels = _kernels()
    return None if kernels is None else kernels.greedy_pick


def int8_output_kernel() -> Int8OutputKernel | None:
    """attnlab's int8 products; None where ``short_attention_kernel`` is None."""
    kernels = _kernels()
    return None if kernels is None else kernels.int8_output


def decoder_attention_kernel() -> DecoderAttentionKernel | None:
    """The decoder step's attention kernel; None where ``short_attention_kernel`` is None."""
    kernels = _kernels()
    return None if kernels is None else kernels.decoder_attention


@functools.cache
def _kernels() -> _Kernels | None:
    if os.environ.get("ATTNLAB_NATIVE", "1").strip() in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    with _lock:
        try:
            path, without_openmp = _build(compiler)
            kernels = _Kernels(ctypes.CDLL(str(path)), path)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError, UnicodeError) as error:
            warnings.warn(
                f"attnlab could not build its compiled kernels ({error}); it uses PyTorch's operations "
                f"instead (delete {cache_dir() / 'native'} to try again; ATTNLAB_NATIVE=0 skips the attempt)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
    if without_openmp:
        warnings.warn(
            f"attnlab's compiled kernels run on one thread: their OpenMP build failed ({without_openmp}); "
            f"delete {path.parent} to try again",
            RuntimeWarning,
            stacklevel=3,
        )
    return kernels


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``), else the
    first of cc, gcc and clang on the PATH."""
    named = shlex.split(os.environ.get("CC", ""))
    if named:
        return [shutil.which(named[0]) or named[0], *named[1:]]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _cpu_identity() -> str:
    """What -march=native builds for: the CPU's model and instruction-set flags where Linux tells."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    wanted = ("model name", "flags", "Features", "CPU part")
    seen = sorted({line.strip() for line in lines if line.split(":")[0].strip() in wanted})
    return "\n".join([platform.machine(), platform.processor(), *seen])


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=_BUILD_TIMEOUT_S)


def _first_error(stderr: str, returncode: int) -> str:
    """The line of a compiler's output that says what went wrong: its first error, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [f"exit status {returncode}"])[0 if errors else -1]


def _intact(library: Path) -> bool:
    """Whether a cached library is the file that was built: its SHA-256 matches the one recorded
    beside it at build time. A truncated shared library crashes the process that loads it (SIGBUS)."""
    try:
        recorded = library.with_suffix(".sha256").read_text().strip()
        return recorded == hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return False


def _build(compiler: list[str]) -> tuple[Path, str]:
    """The kernels' shared library in the cache, compiled there first if it is not there yet; and,
    where that is the build without OpenMP, why the OpenMP build failed ("" otherwise).

    A failed build leaves ``<name>.failed`` holding the compiler's error, so that later processes
    do not try it again (deleting the folder retries). A library whose recorded digest no longer
    matches is built again."""
    sources = sorted(SOURCES.glob("*.c"))
    text = b"\0".join(path.read_bytes() for path in sorted(SOURCES.iterdir()) if path.suffix in (".c", ".h"))
    version = _run([*compiler, "--version"]).stdout
    machine, folder = _cpu_identity(), cache_dir() / "native"
    targets = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join(
            [text, " ".join(compiler).encode(), version.encode(), " ".join(flags).encode(), machine.encode()]
        )).hexdigest()[:16]
        targets.append((flags, folder / f"kernels-{key}.so"))
    errors = []
    for flags, target in targets:
        failed = target.with_suffix(".failed")
        if target.exists() and not _intact(target):  # damaged since: loading it could crash the process
            target.unlink(missing_ok=True)
        if not target.exists() and not failed.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                result = _run([*compiler, *flags, "-std=gnu11", "-fPIC", "-shared", "-o", str(built),
                               *map(str, sources)])
                if result.returncode == 0:  # its digest first, then the library, each renamed into place
                    digest = Path(scratch) / "digest"
                    digest.write_text(hashlib.sha256(built.read_bytes()).hexdigest())
                    os.replace(digest, target.with_suffix(".sha256"))
                    os.replace(built, target)  # whole or not at all, also with several processes building
                else:
                    failed.write_text(f"{Path(compiler[0]).name} {' '.join(flags)}: "
                                      f"{_first_error(result.stderr, result.returncode)}\n")
        if target.exists():
            return target, ("" if flags == _FLAG_SETS[0] else errors[0])
        errors.append(failed.read_text(errors="replace").strip())
    raise RuntimeError("; ".join(errors))
