"""Figures: the positional-encoding table, attention maps and training curves, written as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``, no display, no global
state, no backend switch), so plotting works on headless machines and inside tests. Each
``plot_*`` function has a ``*_figure`` twin that returns the figure before it is saved, for
inspection. A PNG is written to a temporary file first and then renamed into place, so a reader
never sees half a file.

Attention maps are given per layer as (H, T, S) tensors: H heads, T queries, S keys.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..nn.layers import PositionalEncoding
from .report import ATTENTION_KINDS, check_layer, check_maps

__all__ = [
    "positional_encoding_figure",
    "plot_positional_encoding",
    "attention_layer_figure",
    "plot_attention_layer",
    "plot_attention_maps",
    "training_log_figure",
    "plot_training_log",
]

_MAX_COLUMNS = 4  # heads per row of an attention figure


def positional_encoding_figure(
    d_model: int = 32, positions: int = 60, columns: Sequence[int] = (4, 5, 6, 7)
) -> Figure:
    """The table P of ``PositionalEncoding`` as a heatmap, and a few of its columns as curves."""
    if positions <= 0:
        raise ValueError(f"positions must be positive, got {positions}")
    bad = [c for c in columns if not 0 <= c < d_model]
    if bad:
        raise ValueError(f"columns {bad} are outside the {d_model} encoding dimensions 0..{d_model - 1}")
    P = PositionalEncoding(d_model, dropout=0.0, max_len=positions).P[0].numpy()  # (positions, E)

    fig = _new_figure((11.0, 4.5))
    heat_ax, curve_ax = fig.subplots(1, 2, width_ratios=(1.1, 1.0))
    image = heat_ax.imshow(P, aspect="auto", cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    heat_ax.set_xlabel("encoding dimension")
    heat_ax.set_ylabel("position")
    heat_ax.set_title(f"P: {positions} positions x {d_model} dimensions")
    fig.colorbar(image, ax=heat_ax, label="P[position, dimension]")

    for c in columns:
        wave = "sin" if c % 2 == 0 else "cos"
        curve_ax.plot(range(positions), P[:, c], label=f"dim {c} ({wave}, 2j={c - c % 2})")
    curve_ax.set_xlabel("position")
    curve_ax.set_ylabel("value")
    curve_ax.set_ylim(-1.15, 1.6)  # headroom for the legend
    curve_ax.set_title("columns of P: one frequency per sine/cosine pair")
    curve_ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.suptitle(
        "Sinusoidal positional encoding: P[i, 2j] = sin(i / 10000^(2j/d)), "
        "P[i, 2j+1] = cos(i / 10000^(2j/d))"
    )
    return fig


def plot_positional_encoding(
    d_model: int = 32,
    positions: int = 60,
    path: str | os.PathLike[str] = "positional_encoding.png",
    columns: Sequence[int] = (4, 5, 6, 7),
) -> Path:
    """Draw ``positional_encoding_figure`` and save it as a PNG; returns the path."""
    return _save(positional_encoding_figure(d_model, positions, columns), path)


def attention_layer_figure(
    weights: Tensor,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    title: str = "",
    *,
    xlabel: str = "key",
    ylabel: str = "query",
) -> Figure:
    """One layer's attention weights (H, T, S): one heatmap per head, axes labelled with tokens.

    A leading batch dimension of size 1 is accepted. All heads share one colour scale, from 0 to
    the layer's largest weight, so that heads can be compared.
    """
    w = check_layer(weights, len(query_tokens), len(key_tokens))  # (H, T, S)
    H, T, S = w.shape
    ncols = min(H, _MAX_COLUMNS)
    nrows = math.ceil(H / ncols)
    longest = max(T, S)
    panel = min(7.0, max(2.6, 0.2 * longest + 1.2))  # inches per head panel
    fontsize = max(5.0, min(9.0, 180.0 / longest))
    fig = _new_figure((ncols * panel + 1.0, nrows * panel + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    vmax = max(float(w.max()), 1e-6)
    image = None
    for h, ax in enumerate(axes):
        if h >= H:
            ax.remove()
            continue
        image = ax.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"head {h + 1}", fontsize=fontsize + 2)
        ax.set_xticks(range(S), [_label(t) for t in key_tokens], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(T), [_label(t) for t in query_tokens], fontsize=fontsize)
        ax.set_xlabel(xlabel, fontsize=fontsize + 1)
        ax.set_ylabel(ylabel, fontsize=fontsize + 1)
    fig.colorbar(image, ax=list(axes[:H]), label="attention weight", shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def plot_attention_layer(
    weights: Tensor,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    title: str,
    path: str | os.PathLike[str],
    *,
    xlabel: str = "key",
    ylabel: str = "query",
) -> Path:
    """Draw ``attention_layer_figure`` and save it as a PNG; returns the path."""
    fig = attention_layer_figure(weights, query_tokens, key_tokens, title, xlabel=xlabel, ylabel=ylabel)
    return _save(fig, path)


def plot_attention_maps(
    maps: Mapping[str, Sequence[Tensor]],
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    out_dir: str | os.PathLike[str],
) -> list[Path]:
    """Write one PNG per (kind, layer), e.g. ``encoder_layer1.png``, ``cross_layer2.png``.

    ``maps`` holds, for any of the kinds "encoder" (source x source), "decoder" (target x target)
    and "cross" (target queries x source keys), one (H, T, S) tensor per layer.
    """
    maps = check_maps(maps, src_tokens, tgt_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, layers in maps.items():
        spec = ATTENTION_KINDS[kind]
        query_tokens = src_tokens if spec.query_side == "source" else tgt_tokens
        key_tokens = src_tokens if spec.key_side == "source" else tgt_tokens
        for number, weights in enumerate(layers, start=1):
            paths.append(
                plot_attention_layer(
                    weights,
                    query_tokens,
                    key_tokens,
                    f"{spec.label}, layer {number}",
                    out / f"{kind}_layer{number}.png",
                    xlabel=f"{spec.key_side} token (key)",
                    ylabel=f"{spec.query_side} token (query)",
                )
            )
    return paths


def training_log_figure(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Figure | None:
    """One panel per metric against the step, from the evaluation rows of a training log.

    Each row is a dict with "step" and some metrics (as the ``eval`` events of ``log.jsonl``); a
    row without a metric is skipped for that metric, and a metric no row has gets no panel.
    Returns None when no metric has a single point to draw.
    """
    curves = {}
    for metric in metrics:
        points = [(row["step"], row[metric]) for row in rows
                  if "step" in row and row.get(metric) is not None]
        if points:
            curves[metric] = points
    if not curves:
        return None
    fig = _new_figure((4.2 * len(curves) + 0.6, 3.6))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (metric, points) in zip(axes, curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig


def plot_training_log(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: str | os.PathLike[str]
) -> Path | None:
    """Draw ``training_log_figure`` and save it as a PNG; returns the path, or None (and writes
    nothing) when there is nothing to draw."""
    fig = training_log_figure(rows, metrics)
    return None if fig is None else _save(fig, path)


def _label(token: str) -> str:
    """A token as a tick label: matplotlib would read '$...$' as maths, so escape the dollars."""
    return str(token).replace("$", r"\$")


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write the figure as a PNG atomically: into a temporary file beside ``path``, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, format="png", dpi=100)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
