"""A self-contained HTML report of attention maps, and the source tokens each output token attends to.

``write_report`` writes ONE HTML file that works offline, opened straight from disk: the weights
are embedded as JSON, and a little vanilla JavaScript draws the chosen map (kind, layer, head) as
a table of coloured cells with the weight in each cell's tooltip. No server, no network, no
external scripts, styles or fonts.

Attention maps come as ``{kind: [one (H, T, S) tensor per layer]}`` with kind one of
``ATTENTION_KINDS``: "encoder" (source x source), "decoder" (target x target) and "cross"
(target queries x source keys). H heads, T queries, S keys.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "AttentionKind",
    "ATTENTION_KINDS",
    "check_layer",
    "check_maps",
    "write_report",
    "top_attended",
    "format_top_attended",
]


@dataclass(frozen=True)
class AttentionKind:
    """One of the Transformer's three uses of attention: its name and which sides it connects."""

    label: str
    query_side: str  # "source" or "target"
    key_side: str


ATTENTION_KINDS: dict[str, AttentionKind] = {
    "encoder": AttentionKind("encoder self-attention", "source", "source"),
    "decoder": AttentionKind("decoder masked self-attention", "target", "target"),
    "cross": AttentionKind("encoder-decoder (cross) attention", "target", "source"),
}


def check_layer(
    weights: Tensor, queries: int, keys: int, name: str = "attention weights",
    query_label: str = "query tokens", key_label: str = "key tokens",
) -> Tensor:
    """Validate one layer's weights (H, T, S) or (1, H, T, S) against T queries and S keys.

    The one check of an attention map, for the report and the figures alike; returns the weights
    as a float CPU (H, T, S) tensor. ``name`` and the labels word the error message.
    """
    w = torch.as_tensor(weights).detach().float().cpu()
    if w.dim() == 4 and w.size(0) == 1:
        w = w[0]  # (1, H, T, S) -> (H, T, S)
    if w.dim() != 3 or w.shape[1:] != (queries, keys):
        raise ValueError(
            f"{name}: expected weights of shape (heads, {queries}, {keys}) for {queries} "
            f"{query_label} and {keys} {key_label}, got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: attention weights contain NaN or infinity")
    return w


def check_maps(
    maps: Mapping[str, Sequence[Tensor] | Tensor],
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
) -> dict[str, list[Tensor]]:
    """Validate attention maps against the tokens; returns {kind: [float CPU (H, T, S) per layer]}.

    Each kind holds a list of per-layer tensors (H, T, S) or (1, H, T, S), or one (L, H, T, S)
    tensor. Kinds come back in the order of ``ATTENTION_KINDS``.
    """
    unknown = [kind for kind in maps if kind not in ATTENTION_KINDS]
    if unknown:
        raise ValueError(
            f"unknown attention kind(s) {unknown}; valid kinds: {', '.join(ATTENTION_KINDS)}"
        )
    if not maps:
        raise ValueError(f"no attention maps given; expected some of: {', '.join(ATTENTION_KINDS)}")
    sizes = {"source": len(src_tokens), "target": len(tgt_tokens)}
    checked: dict[str, list[Tensor]] = {}
    for kind, spec in ATTENTION_KINDS.items():
        if kind not in maps:
            continue
        layers = maps[kind]
        if isinstance(layers, Tensor):
            layers = list(layers) if layers.dim() == 4 else [layers]
        if len(layers) == 0:
            raise ValueError(f"attention kind {kind!r} has no layers")
        T, S = sizes[spec.query_side], sizes[spec.key_side]
        checked[kind] = [
            check_layer(weights, T, S, f"{kind} layer {number}",
                        f"{spec.query_side} queries", f"{spec.key_side} keys")
            for number, weights in enumerate(layers, start=1)
        ]
    return checked


def write_report(
    maps: Mapping[str, Sequence[Tensor] | Tensor],
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "attnlab: attention maps",
    source_text: str = "",
    translation: str = "",
    output_tokens: Sequence[str] | None = None,
    digits: int = 4,
) -> Path:
    """Write the interactive attention report as one self-contained HTML file; returns its path.

    Args:
        maps: {kind: one (H, T, S) tensor per layer}, kinds from ``ATTENTION_KINDS``.
        src_tokens: source tokens (S); tgt_tokens: the decoder's input tokens (T).
        source_text, translation: shown above the maps.
        output_tokens: optional, the token each decoder position produced (T of them); shown
            beside the target rows and in the tooltips.
        digits: decimals kept for the embedded weights.
    """
    checked = check_maps(maps, src_tokens, tgt_tokens)
    if output_tokens is not None and len(output_tokens) != len(tgt_tokens):
        raise ValueError(
            f"output_tokens has {len(output_tokens)} tokens but tgt_tokens has {len(tgt_tokens)}; "
            "give one output token per decoder position"
        )
    data = {
        "title": title,
        "source_text": source_text,
        "translation": translation,
        "src_tokens": [str(t) for t in src_tokens],
        "tgt_tokens": [str(t) for t in tgt_tokens],
        "output_tokens": None if output_tokens is None else [str(t) for t in output_tokens],
        "kinds": [
            {
                "name": kind,
                "label": ATTENTION_KINDS[kind].label,
                "query_side": ATTENTION_KINDS[kind].query_side,
                "key_side": ATTENTION_KINDS[kind].key_side,
            }
            for kind in checked
        ],
        # kind -> (L, H, T, S) nested lists
        "maps": {kind: [w.round(decimals=digits).tolist() for w in layers] for kind, layers in checked.items()},
    }
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # Inside <script> only "</script" could end the block early; escaping "<", ">" and "&" as
    # JSON unicode escapes leaves the parsed data unchanged.
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = (
        _PAGE.replace("%TITLE%", html.escape(title))
        .replace("%STYLE%", _STYLE)
        .replace("%SCRIPT%", _SCRIPT)
        .replace("%DATA%", payload)
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def top_attended(
    cross_weights: Tensor | Sequence[Tensor],
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    k: int = 3,
    layer: int | None = -1,
) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each target token, the ``k`` source tokens with the most cross-attention.

    Weights are averaged over the heads of one layer: by default the last one, the layer closest
    to the output; ``layer=None`` averages over all layers instead.

    Args:
        cross_weights: (L, H, T, S) tensor, or a list of per-layer (H, T, S) / (1, H, T, S).
        src_tokens: S source tokens; tgt_tokens: T labels, one per decoder position.
    Returns:
        [(target token, [(source token, weight), ... k, largest first]), ... T]
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    layers = check_maps({"cross": cross_weights}, src_tokens, tgt_tokens)["cross"]
    if layer is None:
        w = torch.stack(layers).mean(dim=(0, 1))  # (L, H, T, S) -> (T, S)
    else:
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"layer {layer} does not exist: there are {len(layers)} layers")
        w = layers[layer].mean(dim=0)  # (H, T, S) -> (T, S)
    values, indices = w.topk(min(k, len(src_tokens)), dim=-1)  # (T, k) each
    return [
        (str(tgt), [(str(src_tokens[j]), float(v)) for v, j in zip(row_v.tolist(), row_i.tolist())])
        for tgt, row_v, row_i in zip(tgt_tokens, values, indices)
    ]


def format_top_attended(top: Sequence[tuple[str, Sequence[tuple[str, float]]]], digits: int = 2) -> str:
    """``top_attended``'s result as aligned terminal lines: ``token  ->  src (0.62), src (0.20)``."""
    if not top:
        return ""
    width = max(len(repr(tgt)) for tgt, _ in top)
    lines = []
    for tgt, sources in top:
        ranked = ", ".join(f"{src!r} ({weight:.{digits}f})" for src, weight in sources)
        lines.append(f"{repr(tgt).ljust(width)}  ->  {ranked}")
    return "\n".join(lines)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>%STYLE%</style>
</head>
<body>
<h1 id="title"></h1>
<section class="sentences">
  <div><span class="side">source</span> <span id="source-text"></span></div>
  <div><span class="side">source tokens</span> <span class="tokens" id="src-tokens"></span></div>
  <div><span class="side">translation</span> <span id="translation"></span></div>
  <div><span class="side">target tokens</span> <span class="tokens" id="tgt-tokens"></span></div>
</section>
<form class="controls" id="controls" onsubmit="return false">
  <label>attention <select id="kind"></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <label><input type="checkbox" id="numbers"> show weights</label>
  <label><input type="checkbox" id="absolute"> colour scale 0 to 1</label>
</form>
<p id="caption"></p>
<p id="hover" class="hover">Point at a cell to read its weight.</p>
<div class="scroll"><table id="heatmap"></table></div>
<div class="legend"><span>0</span><span class="bar"></span><span id="legend-max"></span></div>
<script type="application/json" id="attn-data">%DATA%</script>
<script>%SCRIPT%</script>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; }
.sentences div { margin: 0.3em 0; }
.side { display: inline-block; min-width: 8em; color: #666; font-size: 0.9em; }
.tok { display: inline-block; padding: 1px 5px; margin: 1px; border: 1px solid #ccc;
       border-radius: 3px; font-family: ui-monospace, monospace; font-size: 0.85em; }
.tok.hl, th.hl { background: #ffe08a; }
.controls label { margin-right: 1.2em; white-space: nowrap; }
.hover { min-height: 1.3em; font-family: ui-monospace, monospace; font-size: 0.9em; }
.scroll { overflow: auto; max-width: 100%; }
table { border-collapse: collapse; }
th { font-family: ui-monospace, monospace; font-size: 0.75em; font-weight: normal; padding: 2px; }
th.key { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; vertical-align: bottom; }
th.query { text-align: right; white-space: nowrap; }
th.query .out { color: #888; }
td.cell { width: 22px; min-width: 22px; height: 22px; padding: 0; border: 1px solid #f2f2f2;
          text-align: center; font-size: 0.6em; font-family: ui-monospace, monospace; cursor: crosshair; }
td.cell:hover { outline: 2px solid #d95f02; }
.legend { display: flex; align-items: center; gap: 0.5em; margin-top: 0.8em; font-size: 0.85em; }
.legend .bar { display: inline-block; width: 12em; height: 0.9em; border: 1px solid #ccc;
               background: linear-gradient(to right, rgba(8, 48, 107, 0), rgba(8, 48, 107, 1)); }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("attn-data").textContent);
  var kindSelect = document.getElementById("kind");
  var layerSelect = document.getElementById("layer");
  var headSelect = document.getElementById("head");
  var numbersBox = document.getElementById("numbers");
  var absoluteBox = document.getElementById("absolute");
  var table = document.getElementById("heatmap");
  var hover = document.getElementById("hover");

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function option(value, text) {
    var node = el("option", "", text);
    node.value = String(value);
    return node;
  }
  function kindInfo() {
    for (var i = 0; i < data.kinds.length; i++) {
      if (data.kinds[i].name === kindSelect.value) { return data.kinds[i]; }
    }
    return data.kinds[0];
  }
  function tokens(side) { return side === "source" ? data.src_tokens : data.tgt_tokens; }

  function fillTokens(id, list, side) {
    var box = document.getElementById(id);
    list.forEach(function (tok, i) {
      var chip = el("span", "tok", tok);
      chip.id = side + "-tok-" + i;
      box.appendChild(chip);
    });
  }
  function fillLayers() {
    var n = data.maps[kindSelect.value].length;
    var keep = Math.min(Number(layerSelect.value) || 0, n - 1);
    layerSelect.innerHTML = "";
    for (var l = 0; l < n; l++) { layerSelect.appendChild(option(l, String(l + 1))); }
    layerSelect.value = String(keep);
  }
  function fillHeads() {
    var n = data.maps[kindSelect.value][Number(layerSelect.value)].length;
    var keep = headSelect.value === "mean" ? "mean" : String(Math.min(Number(headSelect.value) || 0, n - 1));
    headSelect.innerHTML = "";
    for (var h = 0; h < n; h++) { headSelect.appendChild(option(h, String(h + 1))); }
    headSelect.appendChild(option("mean", "mean of heads"));
    headSelect.value = keep;
  }
  function currentMatrix() {
    var heads = data.maps[kindSelect.value][Number(layerSelect.value)];
    if (headSelect.value !== "mean") { return heads[Number(headSelect.value)]; }
    return heads[0].map(function (row, t) {
      return row.map(function (_, s) {
        var sum = 0;
        for (var h = 0; h < heads.length; h++) { sum += heads[h][t][s]; }
        return sum / heads.length;
      });
    });
  }
  function highlight(info, t, s, on) {
    var ids = [info.query_side + "-tok-" + t, info.key_side + "-tok-" + s, "row-" + t, "col-" + s];
    ids.forEach(function (id) {
      var node = document.getElementById(id);
      if (node) { node.classList.toggle("hl", on); }
    });
  }

  function render() {
    var info = kindInfo();
    var queries = tokens(info.query_side);
    var keys = tokens(info.key_side);
    var outputs = info.query_side === "target" ? data.output_tokens : null;
    var m = currentMatrix();
    var max = 0;
    m.forEach(function (row) { row.forEach(function (w) { if (w > max) { max = w; } }); });
    var top = absoluteBox.checked ? 1 : (max > 0 ? max : 1);
    var digits = 4;

    table.innerHTML = "";
    var head = el("thead");
    var headRow = el("tr");
    headRow.appendChild(el("th", "corner", info.query_side + " \u2193 / " + info.key_side + " \u2192"));
    keys.forEach(function (tok, s) {
      var th = el("th", "key", tok);
      th.id = "col-" + s;
      headRow.appendChild(th);
    });
    head.appendChild(headRow);
    table.appendChild(head);

    var body = el("tbody");
    m.forEach(function (row, t) {
      var tr = el("tr");
      var th = el("th", "query", queries[t]);
      th.id = "row-" + t;
      if (outputs) { th.appendChild(el("span", "out", " \u2192 " + outputs[t])); }
      tr.appendChild(th);
      row.forEach(function (w, s) {
        var td = el("td", "cell");
        var alpha = Math.max(0, Math.min(1, w / top));
        td.style.backgroundColor = "rgba(8, 48, 107, " + alpha.toFixed(3) + ")";
        td.style.color = alpha > 0.55 ? "#fff" : "#222";
        var query = "'" + queries[t] + "'" + (outputs ? " (producing '" + outputs[t] + "')" : "");
        var text = query + " \u2192 '" + keys[s] + "': " + w.toFixed(digits);
        td.title = text;
        td.setAttribute("data-weight", String(w));
        if (numbersBox.checked) { td.textContent = w.toFixed(2).replace(/^0/, ""); }
        td.addEventListener("mouseenter", function () { hover.textContent = text; highlight(info, t, s, true); });
        td.addEventListener("mouseleave", function () { highlight(info, t, s, false); });
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    table.appendChild(body);

    var headName = headSelect.value === "mean" ? "mean of " + (headSelect.options.length - 1) + " heads"
                                                : "head " + (Number(headSelect.value) + 1);
    document.getElementById("caption").textContent = info.label + ", layer " +
      (Number(layerSelect.value) + 1) + ", " + headName + ": " + queries.length + " " +
      info.query_side + " queries \u00d7 " + keys.length + " " + info.key_side + " keys; each row sums to 1.";
    document.getElementById("legend-max").textContent = top.toFixed(digits);
  }

  document.getElementById("title").textContent = data.title;
  document.title = data.title;
  document.getElementById("source-text").textContent = data.source_text;
  document.getElementById("translation").textContent = data.translation;
  fillTokens("src-tokens", data.src_tokens, "source");
  fillTokens("tgt-tokens", data.tgt_tokens, "target");
  data.kinds.forEach(function (k) { kindSelect.appendChild(option(k.name, k.label)); });
  fillLayers();
  fillHeads();
  var small = data.src_tokens.length <= 12 && data.tgt_tokens.length <= 12;
  numbersBox.checked = small;

  kindSelect.addEventListener("change", function () { fillLayers(); fillHeads(); render(); });
  layerSelect.addEventListener("change", function () { fillHeads(); render(); });
  headSelect.addEventListener("change", render);
  numbersBox.addEventListener("change", render);
  absoluteBox.addEventListener("change", render);
  render();
})();
"""
