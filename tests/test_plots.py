"""Figures: the positional-encoding table, attention maps (one panel per head), training curves."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from attnlab.inspect.plots import (
    attention_layer_figure,
    plot_attention_layer,
    plot_attention_maps,
    plot_positional_encoding,
    plot_training_log,
    positional_encoding_figure,
    training_log_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SRC = ["ein", "Mann", "fährt", "Rad", "."]
TGT = ["<bos>", "a", "man", "rides", "a", "bike"]


def random_weights(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).softmax(dim=-1)


def heatmap_axes(fig):
    """The axes that hold a heatmap (colorbars hold none)."""
    return [ax for ax in fig.axes if ax.images]


def tick_texts(labels) -> list[str]:
    return [label.get_text() for label in labels]


def test_positional_encoding_png(tmp_path):
    path = plot_positional_encoding(d_model=32, positions=60, path=tmp_path / "pe.png")
    assert path == tmp_path / "pe.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = imread(path).shape
    assert width > 600 and height > 300


def test_positional_encoding_figure_shows_the_sinusoid_table():
    fig = positional_encoding_figure(d_model=32, positions=60, columns=(4, 5, 6, 7))
    (heat,) = heatmap_axes(fig)
    table = np.asarray(heat.images[0].get_array())
    assert table.shape == (60, 32)
    for i, j in [(0, 0), (7, 2), (59, 15)]:  # P[i, 2j] = sin(i / 10000^(2j/d)), P[i, 2j+1] = cos(...)
        angle = i / 10000 ** (2 * j / 32)
        assert table[i, 2 * j] == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[i, 2 * j + 1] == pytest.approx(math.cos(angle), abs=1e-6)
    assert heat.get_xlabel() == "encoding dimension" and heat.get_ylabel() == "position"
    curves = next(ax for ax in fig.axes if ax.lines)
    assert len(curves.lines) == 4
    np.testing.assert_allclose(curves.lines[1].get_ydata(), table[:, 5])
    assert len(fig.axes) == 3  # heatmap, colorbar, curves
    assert "sin(i / 10000^(2j/d))" in fig.get_suptitle()


def test_positional_encoding_rejects_bad_arguments():
    with pytest.raises(ValueError, match="outside the 32 encoding dimensions"):
        positional_encoding_figure(d_model=32, columns=(31, 32))
    with pytest.raises(ValueError, match="positions must be positive"):
        positional_encoding_figure(positions=0)


def test_attention_layer_figure_has_one_labelled_heatmap_per_head():
    weights = random_weights(4, len(TGT), len(SRC))  # (H, T, S)
    fig = attention_layer_figure(weights, TGT, SRC, "cross, layer 1", xlabel="source", ylabel="target")
    axes = heatmap_axes(fig)
    assert len(axes) == 4
    for h, ax in enumerate(axes):
        assert ax.get_title() == f"head {h + 1}"
        assert tick_texts(ax.get_xticklabels()) == SRC
        assert tick_texts(ax.get_yticklabels()) == TGT
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("source", "target")
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), weights[h].numpy())
    assert len(fig.axes) == 5  # plus one shared colorbar


def test_attention_layer_figure_for_eight_heads_and_thirty_tokens():
    tokens = [f"tok{i}" for i in range(30)]
    fig = attention_layer_figure(random_weights(1, 8, 30, 30), tokens, tokens)  # leading batch of 1
    assert len(heatmap_axes(fig)) == 8
    width, height = fig.get_size_inches()
    assert width > 2 * height * 0.9  # two rows of four heads


def test_attention_layer_figure_drops_empty_grid_cells_and_escapes_dollars():
    fig = attention_layer_figure(random_weights(5, 2, 2), ["$5", "x"], ["a", "b"])
    assert len(heatmap_axes(fig)) == 5
    assert len(fig.axes) == 6  # no empty panels left in the 2 x 4 grid
    assert tick_texts(heatmap_axes(fig)[0].get_yticklabels())[0] == r"\$5"


def test_attention_layer_figure_checks_shapes_and_values():
    expected = r"expected weights of shape \(heads, 6, 5\) for 6 query tokens and 5 key tokens"
    with pytest.raises(ValueError, match=expected + r", got \(4, 5, 5\)"):
        attention_layer_figure(random_weights(4, 5, 5), TGT, SRC)
    with pytest.raises(ValueError, match=expected + r", got \(6, 5\)"):
        attention_layer_figure(random_weights(6, 5), TGT, SRC)
    broken = random_weights(2, 6, 5)
    broken[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        attention_layer_figure(broken, TGT, SRC)


def test_plot_attention_layer_writes_a_png(tmp_path):
    path = plot_attention_layer(random_weights(2, 6, 5), TGT, SRC, "title", tmp_path / "sub" / "a.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_attention_maps_writes_one_png_per_kind_and_layer(tmp_path):
    S, T, H = len(SRC), len(TGT), 4
    maps = {
        "encoder": [random_weights(H, S, S, seed=layer) for layer in range(2)],
        "decoder": [random_weights(H, T, T, seed=layer) for layer in range(2)],
        "cross": [random_weights(H, T, S, seed=layer) for layer in range(2)],
    }
    paths = plot_attention_maps(maps, SRC, TGT, tmp_path)
    assert [p.name for p in paths] == [
        "encoder_layer1.png", "encoder_layer2.png",
        "decoder_layer1.png", "decoder_layer2.png",
        "cross_layer1.png", "cross_layer2.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_attention_maps_two_encoder_layers_of_four_heads(tmp_path):
    layers = [random_weights(4, len(SRC), len(SRC), seed=layer) for layer in range(2)]
    paths = plot_attention_maps({"encoder": layers}, SRC, TGT, tmp_path)
    assert [p.name for p in paths] == ["encoder_layer1.png", "encoder_layer2.png"]
    for w in layers:
        fig = attention_layer_figure(w, SRC, SRC)
        assert len(heatmap_axes(fig)) == 4


def test_plot_attention_maps_rejects_unknown_kinds_and_wrong_shapes(tmp_path):
    with pytest.raises(ValueError, match="valid kinds: encoder, decoder, cross"):
        plot_attention_maps({"self": [random_weights(2, 6, 6)]}, SRC, TGT, tmp_path)
    with pytest.raises(ValueError, match="cross layer 1"):
        plot_attention_maps({"cross": [random_weights(2, 5, 6)]}, SRC, TGT, tmp_path)


# -- training curves ---------------------------------------------------------------------------
# Evaluation rows as the trainer logs them; BLEU is missing from the second row.
LOG = [
    {"event": "eval", "step": 100, "train_loss": 5.0, "val_loss": 4.5, "val_bleu": 1.5},
    {"event": "eval", "step": 200, "train_loss": 4.0, "val_loss": 3.9},
    {"event": "eval", "step": 300, "train_loss": 3.5, "val_loss": 3.6, "val_bleu": 9.0},
]


def curve(ax) -> tuple[list[float], list[float]]:
    (line,) = ax.lines
    return list(line.get_xdata()), list(line.get_ydata())


def test_training_log_png_has_one_panel_per_metric(tmp_path):
    path = plot_training_log(LOG, ["train_loss", "val_loss", "val_bleu"], tmp_path / "runs" / "loss.png")
    assert path == tmp_path / "runs" / "loss.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = imread(path).shape
    assert width > 2.5 * height  # three panels side by side
    assert os.listdir(path.parent) == ["loss.png"]  # the temporary file was renamed, not left

    fig = training_log_figure(LOG, ["train_loss", "val_loss", "val_bleu"])
    assert [ax.get_title() for ax in fig.axes] == ["train_loss", "val_loss", "val_bleu"]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)
    assert curve(fig.axes[0]) == ([100, 200, 300], [5.0, 4.0, 3.5])
    assert curve(fig.axes[2]) == ([100, 300], [1.5, 9.0])  # the row without BLEU is skipped


def test_training_log_skips_missing_metrics_and_draws_nothing_from_nothing(tmp_path):
    fig = training_log_figure(LOG, ["train_loss", "val_bleu_lc"])  # no row has val_bleu_lc
    assert [ax.get_title() for ax in fig.axes] == ["train_loss"]
    assert plot_training_log([], ["train_loss", "val_loss"], tmp_path / "a.png") is None
    assert plot_training_log([{"step": 5}], ["val_loss"], tmp_path / "b.png") is None
    assert plot_training_log(LOG, [], tmp_path / "c.png") is None
    assert list(tmp_path.iterdir()) == []  # nothing drawn, nothing written


def test_a_failed_write_keeps_the_previous_png(tmp_path, monkeypatch):
    path = plot_training_log(LOG, ["train_loss"], tmp_path / "loss.png")
    before = path.read_bytes()

    def half_written(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_SIGNATURE)  # a partial file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="No space left"):
        plot_training_log(LOG, ["train_loss", "val_loss"], path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["loss.png"]


def test_plotting_uses_neither_pyplot_nor_a_backend_switch(tmp_path):
    script = (
        "import sys, matplotlib\n"
        "from attnlab.inspect.plots import plot_training_log, plot_positional_encoding\n"
        f"plot_training_log([{{'step': 1, 'val_loss': 2.0}}], ['val_loss'], {str(tmp_path / 'a.png')!r})\n"
        f"plot_positional_encoding(path={str(tmp_path / 'b.png')!r})\n"
        "print('matplotlib.pyplot' in sys.modules, matplotlib.rcParams['backend'])\n"
    )
    env = {**os.environ, "MPLBACKEND": "pdf", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "pdf"]
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE
