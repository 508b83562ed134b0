"""Figures: the positional-encoding table and attention maps, one panel per head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from attnlab.inspect.plots import (
    attention_layer_figure,
    plot_attention_layer,
    plot_attention_maps,
    plot_positional_encoding,
    positional_encoding_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SRC = ["ein", "Mann", "fährt", "Rad", "."]
TGT = ["<bos>", "a", "man", "rides", "a", "bike"]


def random_weights(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).softmax(dim=-1)


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
    torch.manual_seed(0)
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


def test_attention_layer_figure_checks_shapes():
    with pytest.raises(ValueError, match="do not match 6 query tokens and 5 key tokens"):
        attention_layer_figure(random_weights(4, 5, 5), TGT, SRC)
    with pytest.raises(ValueError, match=r"\(heads, queries, keys\)"):
        attention_layer_figure(random_weights(6, 5), TGT, SRC)


def test_plot_attention_layer_writes_a_png(tmp_path):
    path = plot_attention_layer(random_weights(2, 6, 5), TGT, SRC, "title", tmp_path / "sub" / "a.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_attention_maps_writes_one_png_per_kind_and_layer(tmp_path):
    torch.manual_seed(1)
    S, T, H = len(SRC), len(TGT), 4
    maps = {
        "encoder": [random_weights(H, S, S) for _ in range(2)],
        "decoder": [random_weights(H, T, T) for _ in range(2)],
        "cross": [random_weights(H, T, S) for _ in range(2)],
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
    layers = [random_weights(4, len(SRC), len(SRC)) for _ in range(2)]
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
