"""The lean decoding steps reproduce the modules (the decoder-only model's and the encoder-decoder
Transformer's), caches included, and refuse a model that differs from what they compute."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_norms_, tiny_language_model, tiny_transformer
from torch import nn

from attnlab.data.batching import pad_sequences
from attnlab.decode.generate import generate
from attnlab.decode.translate import DecodeConfig, Translator
from attnlab.nn import fast_decode, native
from attnlab.nn.model import DecoderOnlyTransformer, Transformer


def _model(norm_first: bool, **overrides) -> DecoderOnlyTransformer:
    """The shared tiny language model (vocabulary 30, context 16), biases and norms made non-trivial."""
    model = tiny_language_model(0, norm_first=norm_first, **overrides)
    with torch.no_grad():  # non-zero biases, so a bias left out or misplaced shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return randomize_norms_(model, torch.Generator().manual_seed(1)).eval()


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_step_equals_the_modules_for_a_prefix_then_single_tokens_then_a_chunk(norm_first):
    model = _model(norm_first)
    packed = fast_decode.pack(model)
    tokens = torch.randint(0, 30, (3, 16), generator=torch.Generator().manual_seed(2))
    full = model(tokens)  # (3, 16, 30)
    state, module_state = model.start(), model.start()
    for a, b in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 12), (12, 13)]:  # prefix, tokens, a chunk, a token
        logits, state = fast_decode.step(packed, tokens[:, a:b], state)
        torch.testing.assert_close(logits, full[:, b - 1], atol=1e-5, rtol=0)
        _, module_state = model.step(tokens[:, a:b], module_state)
        assert state.length == module_state.length == b
        for ours, theirs in zip(state.self_kv, module_state.self_kv):
            torch.testing.assert_close(ours.k, theirs.k, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours.v, theirs.v, atol=1e-5, rtol=0)


def test_cached_generation_equals_the_modules_read_uncached():
    model = _model(norm_first=False)
    prompt = torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 40, seed=5, keep=8)
    plain = generate(model, prompt, 40, seed=5, keep=8, use_cache=False)
    assert torch.equal(cached, plain)


def test_pack_and_step_refuse_what_they_cannot_do():
    model = _model(norm_first=True)
    with pytest.raises(ValueError, match="eval"):
        fast_decode.pack(model.train())
    packed = fast_decode.pack(model.eval())
    _, state = fast_decode.step(packed, torch.ones(1, 16, dtype=torch.long), model.start())
    with pytest.raises(ValueError, match="17 positions"):
        fast_decode.step(packed, torch.ones(1, 1, dtype=torch.long), state)


@pytest.mark.parametrize("prompt, message", [
    (torch.tensor([[1, 30]]), r"0\.\.29"), (torch.tensor([[-1]]), r"0\.\.29"),
    (torch.zeros(0, 3, dtype=torch.long), "at least one token"), (torch.ones(1, 2), "integer token ids"),
    (torch.ones(2, dtype=torch.long), r"shape \(batch, length\)"),
])
def test_generate_names_a_bad_prompt(prompt, message):
    with pytest.raises(ValueError, match=message):
        generate(_model(norm_first=True), prompt, 3)


# -- pack checks every assumption the lean step makes ---------------------------------------------------
def _gelu_feed_forward(model):
    model.layers[1].feed_forward.activation = F.gelu


def _eps(model):
    model.layers[0].norm2.eps = 1e-6


def _norm_placement(model):
    model.layers[0].norm_first = not model.layers[0].norm_first


def _untied_output(model):
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())


def _output_bias(model):
    model.output.bias = nn.Parameter(torch.zeros(model.config.vocab_size))


def _dropout_in_training(model):
    model.layers[1].dropout1.train()


def _extra_module(model):
    model.layers[0].scale = nn.Linear(32, 32).eval()


def _heads(model):
    model.layers[0].self_attn.num_heads = 8


@pytest.mark.parametrize("change, message", [
    (_gelu_feed_forward, "ReLU"), (_eps, "eps 1e-05"), (_norm_placement, "norm_first=True"),
    (_untied_output, "tied to the embeddings"), (_output_bias, "without bias"), (_dropout_in_training, "eval"),
    (_extra_module, r"exactly the modules .*'scale'"), (_heads, "num_heads=4"),
])
def test_pack_refuses_a_model_that_differs_from_what_step_computes(change, message):
    model = _model(norm_first=True)
    fast_decode.pack(model)  # the model as it is: accepted
    change(model)
    with pytest.raises(ValueError, match=message):
        fast_decode.pack(model)


def test_pack_follows_the_config_for_tying_and_norms():
    model = _model(norm_first=False, tie_embeddings=False)
    packed = fast_decode.pack(model)
    assert packed.final_norm is None and packed.output.data_ptr() == model.output.weight.data_ptr()
    model.output.weight = model.embed.embedding.weight  # tied, although the config says untied
    with pytest.raises(ValueError, match="separate from the embeddings"):
        fast_decode.pack(model)


# -- the encoder-decoder Transformer's lean step ----------------------------------------------------------
PAD, BOS, EOS = 0, 1, 2
SOURCES = [[5, 6, 7, 8, EOS], [9, 10, EOS], [11, 12, 13, 14, 15, 16, EOS]]
LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]
LAYOUT_IDS = ["post-LN", "post-LN-shared", "pre-LN", "pre-LN-shared"]


def _transformer(norm_first: bool, share_embeddings: bool, seed: int = 0) -> Transformer:
    """The shared tiny Transformer (vocabulary 40), biases and norms made non-trivial."""
    model = tiny_transformer(seed, d_model=32, d_ff=64, norm_first=norm_first, share_embeddings=share_embeddings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        model.output.bias[EOS] -= 1.0  # translations of several tokens, most ending before their limit
    return randomize_norms_(model, torch.Generator().manual_seed(1)).eval()


class _Ids:  # a vocabulary stand-in: only the special ids matter here
    pad_id, bos_id, eos_id = PAD, BOS, EOS


needs_kernels = pytest.mark.skipif(native.decoder_attention_kernel() is None,
                                   reason="attnlab's compiled kernels could not be built here (no C compiler?)")
PATHS = [False, pytest.param(True, marks=needs_kernels)]
PATH_IDS = ["pytorch", "compiled"]


@pytest.mark.parametrize("compiled", PATHS + [pytest.param("compacting", marks=needs_kernels)],
                         ids=PATH_IDS + ["compiled-compacting"])
@pytest.mark.parametrize("norm_first, share", LAYOUTS, ids=LAYOUT_IDS)
def test_decoder_step_equals_the_modules_through_reordering_and_shrinking(norm_first, share, compiled, monkeypatch):
    if compiled == "compacting":  # finished rows' steps gathered away as soon as they are twice the live ones
        monkeypatch.setattr(fast_decode, "COMPACT_BYTES", 0)
    model = _transformer(norm_first, share)
    packed = fast_decode.pack_decoder(model)
    encoded = model.encode(pad_sequences(SOURCES, PAD))
    lean, modules = fast_decode.start_decoding(packed, encoded, bool(compiled)), model.start_decoding(encoded)
    assert type(lean) is (fast_decode.NativeDecoderState if compiled else fast_decode.LeanDecoderState)
    tokens = torch.randint(3, 40, (9, 6), generator=torch.Generator().manual_seed(2))
    # Beams of three per source, reordered within their sources, then rows leaving, then any order.
    selections = [torch.arange(3).repeat_interleave(3), torch.tensor([2, 0, 0, 3, 5, 4, 8, 8, 6]),
                  None, torch.tensor([0, 1, 2, 6, 7, 8]), torch.tensor([5, 0, 3, 3])]
    rows, groups = torch.arange(3), []
    for i, index in enumerate(selections):
        if index is not None:
            lean, modules, rows = lean.select(index), modules.select(index), rows[index]
        if not compiled:
            sources = None if lean.sources is None else lean.sources.tolist()
            groups.append((lean.rows_per_source, len(lean.src_mask), sources))
        logits, lean = fast_decode.decoder_step(packed, tokens[rows, i : i + 1], lean)
        expected, modules, _, _ = model.decode_step(tokens[rows, i : i + 1], modules)
        torch.testing.assert_close(logits, expected[:, 0], atol=1e-5, rtol=0)
    assert lean.length == modules.length == len(selections)
    if compiled == "compacting":  # the last step found 9 + 9 + 9 + 6 = 33 rows kept for 4 still decoding
        # (more than twice 4 x 4 steps) and first gathered those 4 rows' lines: equal logits through it too
        assert [len(qkv) for qkv in lean.steps[0]] == [4, 4, 4, 4, 4]
        assert lean.held == 20 and lean.parents == (None,) * 5
    if compiled:  # otherwise each step's projection kept as it was written, the rows named by maps
        if compiled is True:
            assert [len(qkv) for qkv in lean.steps[0]] == [9, 9, 9, 6, 4] and lean.held == 37
        assert lean.memory_kv[0].shape == (int(encoded.src_mask.sum()), 2 * 32)  # padding left out
        return
    # The sources' keys/values stay one per source while the rows keep in groups of three (beams); when
    # two of the three sentences remain they stay in place, the groups naming their sources (0 and 2);
    # once the groups are split and repeated they are gathered, one per row.
    assert groups == [(3, 3, None), (3, 3, None), (3, 3, None), (3, 3, [0, 2]), (1, 4, None)]


def test_sources_keys_and_values_are_gathered_once_fewer_than_half_are_read():
    model = _transformer(False, False)
    packed = fast_decode.pack_decoder(model)
    sources = SOURCES + SOURCES[:1]  # four sentences, one row each (greedy search)
    encoded = model.encode(pad_sequences(sources, PAD))
    lean, modules = fast_decode.start_decoding(packed, encoded, compiled=False), model.start_decoding(encoded)
    tokens = torch.randint(3, 40, (4, 4), generator=torch.Generator().manual_seed(3))
    rows, seen = torch.arange(4), []
    for i, index in enumerate([None, torch.tensor([0, 2, 3]), torch.tensor([0, 2]), torch.tensor([1])]):
        if index is not None:
            lean, modules, rows = lean.select(index), modules.select(index), rows[index]
        seen.append((len(lean.src_mask), None if lean.sources is None else lean.sources.tolist()))
        logits, lean = fast_decode.decoder_step(packed, tokens[rows, i : i + 1], lean)
        expected, modules, _, _ = model.decode_step(tokens[rows, i : i + 1], modules)
        torch.testing.assert_close(logits, expected[:, 0], atol=1e-5, rtol=0)
    # 3 of 4 read: in place; 2 of 4 (half): in place; 1 of 4: gathered.
    assert seen == [(4, None), (4, [0, 2, 3]), (4, [0, 3]), (1, None)]


@pytest.mark.parametrize("compiled", PATHS, ids=PATH_IDS)
def test_decoder_step_reads_only_the_source_positions_the_mask_opens(compiled):
    """A source mask with holes (not only padding at the end), one source fully open: the compiled
    state keeps the open positions' keys and values only, and both paths equal the modules."""
    model = _transformer(True, False)
    packed = fast_decode.pack_decoder(model)
    src = pad_sequences(SOURCES, PAD)
    mask = src != PAD
    mask[0, 1] = mask[2, 0] = False  # holes inside the sentences
    mask[1] = True  # padding opened
    encoded = model.encode(src, mask[:, None, None, :])
    lean = fast_decode.start_decoding(packed, encoded, compiled=compiled)
    if compiled:
        assert lean.memory_kv[0].shape == (int(mask.sum()), 2 * 32)
        assert lean.offsets.tolist() == [0, *mask.sum(dim=1).cumsum(0).tolist()]
    modules = model.start_decoding(encoded)
    tokens = torch.randint(3, 40, (3, 4), generator=torch.Generator().manual_seed(4))
    rows = torch.arange(3)
    for i, index in enumerate([None, torch.tensor([2, 0]), None, torch.tensor([1, 1, 0])]):
        if index is not None:
            lean, modules, rows = lean.select(index), modules.select(index), rows[index]
        logits, lean = fast_decode.decoder_step(packed, tokens[rows, i : i + 1], lean)
        expected, modules, _, _ = model.decode_step(tokens[rows, i : i + 1], modules)
        torch.testing.assert_close(logits, expected[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("compiled", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("norm_first, share", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("beam", [1, 3])
def test_lean_translation_equals_the_module_reference(norm_first, share, beam, compiled, monkeypatch):
    if not compiled:  # the path PyTorch's operations take (as on a GPU)
        monkeypatch.setattr(fast_decode, "_takes_native", lambda packed, memory: False)
    translator = Translator(_transformer(norm_first, share), _Ids(), _Ids())
    lean = translator.translate_ids(SOURCES, DecodeConfig(beam_size=beam, extra_len=10))
    modules = translator.translate_ids(SOURCES, DecodeConfig(beam_size=beam, extra_len=10, use_cache=False))
    assert lean == modules
    assert any(len(ids) > 2 for ids in lean)  # real multi-step decodes were compared


@pytest.mark.parametrize("compiled", PATHS, ids=PATH_IDS)
def test_two_searches_from_one_state_do_not_disturb_each_other(compiled):
    model = _transformer(False, False)
    packed = fast_decode.pack_decoder(model)
    start = fast_decode.start_decoding(packed, model.encode(pad_sequences(SOURCES, PAD)), compiled).select(
        torch.arange(3).repeat_interleave(2))  # two rows per source
    generator = torch.Generator().manual_seed(4)
    ours, theirs = (torch.randint(3, 40, (6, 5), generator=generator) for _ in range(2))

    def alone(tokens):
        state, out = start, []
        for i in range(5):
            logits, state = fast_decode.decoder_step(packed, tokens[:, i : i + 1], state)
            out.append(logits)
            state = state.select(torch.tensor([1, 0, 2, 3, 5, 4]))  # reorder, as beam search does
        return out

    expected_ours, expected_theirs = alone(ours), alone(theirs)
    a = b = start  # interleaved: each step of one search between two of the other, from one state
    for i in range(5):
        logits_a, a = fast_decode.decoder_step(packed, ours[:, i : i + 1], a)
        logits_b, b = fast_decode.decoder_step(packed, theirs[:, i : i + 1], b)
        a, b = a.select(torch.tensor([1, 0, 2, 3, 5, 4])), b.select(torch.tensor([1, 0, 2, 3, 5, 4]))
        assert torch.equal(logits_a, expected_ours[i]) and torch.equal(logits_b, expected_theirs[i])
    # The first state is still the empty one: a third search from it starts afresh.
    logits, _ = fast_decode.decoder_step(packed, ours[:, :1], start)
    assert torch.equal(logits, expected_ours[0])
    # And a state two steps in, stepped twice: the two continuations see the same past.
    state = start
    for i in range(2):
        _, state = fast_decode.decoder_step(packed, ours[:, i : i + 1], state)
    first, _ = fast_decode.decoder_step(packed, ours[:, 2:3], state)
    fork, _ = fast_decode.decoder_step(packed, theirs[:, 2:3], state)
    again, _ = fast_decode.decoder_step(packed, ours[:, 2:3], state)
    assert torch.equal(first, again) and not torch.equal(first, fork)


def test_decoder_step_refuses_what_it_cannot_do():
    model = _transformer(True, False)
    packed = fast_decode.pack_decoder(model)
    state = fast_decode.start_decoding(packed, model.encode(pad_sequences(SOURCES, PAD)))
    with pytest.raises(ValueError, match="one token for each of the state's 3 rows"):
        fast_decode.decoder_step(packed, torch.ones(3, 2, dtype=torch.long), state)
    with pytest.raises(ValueError, match="one token for each of the state's 3 rows"):
        fast_decode.decoder_step(packed, torch.ones(2, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="eval"):
        fast_decode.pack_decoder(model.train())


def _decoder_gelu(model):
    model.decoder_layers[1].feed_forward.activation = F.gelu


def _decoder_eps(model):
    model.decoder_layers[0].norm3.eps = 1e-6


def _decoder_norm_placement(model):
    model.decoder_layers[1].norm_first = not model.decoder_layers[1].norm_first


def _decoder_dropout(model):
    model.decoder_layers[0].dropout2.train()


def _cross_attention_without_bias(model):
    model.decoder_layers[0].cross_attn.in_proj_bias = None


def _decoder_extra_module(model):
    model.decoder_layers[0].gate = nn.Linear(32, 32).eval()


def _output_without_bias(model):
    model.output.bias = None


def _embeddings_shared_against_the_config(model):
    model.tgt_embed = model.src_embed


def _output_tied_against_the_config(model):
    model.output.weight = model.tgt_embed.embedding.weight


def _cross_heads(model):
    model.decoder_layers[1].cross_attn.num_heads = 8


@pytest.mark.parametrize("change, message", [
    (_decoder_gelu, "ReLU"), (_decoder_eps, "eps 1e-05"), (_decoder_norm_placement, "norm_first=False"),
    (_decoder_dropout, "eval"), (_cross_attention_without_bias, "cross-attention's projections have biases"),
    (_decoder_extra_module, r"exactly the modules .*'gate'"), (_output_without_bias, "output layer with a bias"),
    (_embeddings_shared_against_the_config, "separate from the source's"),
    (_output_tied_against_the_config, "separate from the target embeddings"), (_cross_heads, "num_heads=4"),
])
def test_pack_decoder_refuses_a_model_that_differs_from_what_the_step_computes(change, message):
    model = _transformer(False, False)
    fast_decode.pack_decoder(model)  # the model as it is: accepted
    change(model)
    with pytest.raises(ValueError, match=message):
        fast_decode.pack_decoder(model)


# -- the encoder's lean form (translation on the CPU) ---------------------------------------------------
@pytest.mark.parametrize("norm_first, share", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("length", [7, 70], ids=["short", "long"])  # the compiled attention up to 64, then PyTorch's
def test_lean_encoder_equals_the_modules(norm_first, share, length, monkeypatch):
    monkeypatch.setattr(fast_decode, "int8_from_rows", lambda fan_in, fan_out: 1)  # int8 at any size (test_int8.py)
    model = tiny_transformer(0, d_model=32, d_ff=64, norm_first=norm_first, share_embeddings=share, max_len=128)
    model = randomize_norms_(model, torch.Generator().manual_seed(1)).eval()
    generator = torch.Generator().manual_seed(length)
    sources = [torch.randint(3, 40, (n,), generator=generator).tolist() + [EOS] for n in (length - 1, 2, length // 2)]
    src = pad_sequences(sources, PAD)
    with torch.no_grad():
        expected = model.encode(src)
    packed = fast_decode.pack_encoder(model)
    lean = fast_decode.encode(packed, src, expected.src_mask)
    assert torch.equal(lean.memory, expected.memory)  # the same operations in the same order: equal to the bit
    assert lean.src_mask is expected.src_mask
    int8 = fast_decode.encode(fast_decode.pack_encoder(model, int8=True), src, expected.src_mask)
    error = float((int8.memory - expected.memory).abs().max())
    assert 1e-4 < error < 0.2 * float(expected.memory.std())  # 8-bit products: close, not equal


def test_pack_encoder_refuses_a_model_that_differs_from_what_encode_computes():
    model = _transformer(True, False)
    fast_decode.pack_encoder(model)
    model.encoder_layers[1].feed_forward.activation = F.gelu
    with pytest.raises(ValueError, match="encoder layer 1's feed-forward block is PositionwiseFeedForward with a ReLU"):
        fast_decode.pack_encoder(model)
    with pytest.raises(ValueError, match="eval"):
        fast_decode.pack_encoder(_transformer(True, False).train())


@needs_kernels
def test_the_compiled_state_checks_and_copies_what_select_is_given_and_survives_a_deep_copy():
    import copy

    model = _transformer(False, False)
    packed = fast_decode.pack_decoder(model)
    state = fast_decode.start_decoding(packed, model.encode(pad_sequences(SOURCES, PAD)), compiled=True)
    with pytest.raises(IndexError, match="outside the state's 3: 0 to 3"):
        state.select(torch.tensor([0, 3]))  # the kernel would read past the rows
    with pytest.raises(IndexError, match="-1 to 1"):
        state.select(torch.tensor([-1, 1]))
    tokens = torch.randint(3, 40, (3, 3), generator=torch.Generator().manual_seed(8))
    _, state = fast_decode.decoder_step(packed, tokens[:, :1], state)
    index = torch.tensor([2, 0, 1])
    chosen = state.select(index)
    index.fill_(7)  # the caller's tensor changes afterwards: the state does not
    twin = copy.deepcopy(chosen)  # new tensors: the addresses the copy carries are stale until its next step
    expected, _ = fast_decode.decoder_step(packed, tokens[[2, 0, 1], 1:2], chosen)
    del chosen, state
    logits, _ = fast_decode.decoder_step(packed, tokens[[2, 0, 1], 1:2], twin)
    assert torch.equal(logits, expected)


def test_int8_encoder_with_heads_wider_than_the_kernel_takes():
    model = tiny_transformer(0, d_model=264, num_heads=1, d_ff=64).eval()  # head dim 264 > native.MAX_HEAD_DIM
    src = pad_sequences(SOURCES, PAD)
    with torch.no_grad():
        expected = model.encode(src)
    lean = fast_decode.encode(fast_decode.pack_encoder(model), src, expected.src_mask)
    torch.testing.assert_close(lean.memory, expected.memory, atol=2e-5, rtol=0)


# -- greedy search's choice through the int8 screen ------------------------------------------------------
def _screen_bound(screen: fast_decode.OutputScreen, hidden: torch.Tensor) -> torch.Tensor:
    """The bound the screen relies on, (N, V), as ``fast_decode.screened_pick`` and the kernel form it:
    each row's half step its range (zero included) over 127, halved, with room for rounding."""
    step = ((hidden.clamp(min=0).amax(dim=1) - hidden.clamp(max=0).amin(dim=1)) / 127).clamp(min=1e-30)
    half_step = (0.5 * step * (1 + 1e-3))[:, None]
    beta = hidden.abs().sum(dim=1, keepdim=True) + hidden.size(1) * half_step
    return half_step * screen.l1 + beta * screen.error + screen.slack


def _int8_logits(screen: fast_decode.OutputScreen, hidden: torch.Tensor) -> torch.Tensor:
    """The screen's int8 logits: attnlab's int8 product of its output layer."""
    return native.int8_output_kernel().linear(hidden, screen.int8)


def _output_layer(E: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An output layer's Wᵀ (E, V) and b as ``pack_decoder`` holds them: rows of mixed scales, as a
    trained layer's are (a few large weights, most small)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, E, generator=gen) * torch.rand(V, 1, generator=gen).add(0.05) / E**0.5
    weight[torch.rand(V, E, generator=gen) < 0.01] *= 8
    return weight.t(), torch.randn(V, generator=gen)


def _hidden_states(N: int, E: int, seed: int) -> list[torch.Tensor]:
    """Hidden states of every kind the bound must hold for: normal, an outlier, one-signed (all above or
    all below zero), very small and very large, a single row, a row of zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, E, generator=gen)
    outlier = x.clone()
    outlier[0, 3] = 60.0
    zeros = x.clone()
    zeros[1] = 0
    return [x, outlier, x.abs() + 0.5, -x.abs(), x * 1e-3, x * 300, x[:1].clone(), zeros]


@pytest.mark.parametrize("E, V", [(32, 40), (128, 1000), (256, 517)])
def test_the_int8_screens_bound_holds_for_its_int8_product(E, V):
    """The int8 product of the output layer lies within the screen's bound of the exact logits
    (computed in float64) for every token and every kind of hidden state: what makes the screened
    choice the float32 one. And the bound is tight enough to leave few tokens in contention."""
    screen = fast_decode.output_screen(fast_decode.PackedDecoder(
        None, 1.0, None, (), None, _output_layer(E, V, seed=E), 1, False, False))
    if screen is None:
        pytest.skip("the int8 screen does not apply here (kernels not built)")
    for hidden in _hidden_states(64, E, seed=V):
        approx = _int8_logits(screen, hidden)
        exact = hidden.double() @ screen.rows.double().t() + screen.bias.double()
        bound = _screen_bound(screen, hidden).double()
        assert bool(((approx.double() - exact).abs() <= bound).all())
        # ... and not so loose that it is worthless: the worst error is over a tenth of the bound's
        assert float(((approx.double() - exact).abs() / bound).max()) > 0.1


def test_the_int8_screens_bound_holds_where_each_quantization_errs_most():
    """Errors made to add up, one kind at a time: activations just short of halfway between the int8
    steps with weights all positive (each row a range of 2.0 in 127 steps, then rows of other ranges,
    down to 1e-3), then activations exact (all at the maximum) with weights just short of halfway
    between theirs. Each lies within the bound, and close to it (a bound that assumed 8-bit
    activations, or one step for the whole batch where rows have their own, or left out the weights'
    error, would fail here)."""
    E, V = 64, 48
    gen = torch.Generator().manual_seed(0)
    cases = []
    for top in (torch.full((16, 1), 2.0), torch.logspace(-3, 1, 16)[:, None]):
        step = top / 127  # each row's own
        hidden = (torch.randint(0, 3, (16, E), generator=gen) + 0.49) * step
        hidden[:, :1] = top
        cases.append((torch.rand(V, E, generator=gen) * 0.5, hidden))
    cases.append((torch.full((V, E), 0.49 / 127).index_fill_(1, torch.tensor([0]), 1.0), torch.ones(16, E)))
    for weight, hidden in cases:
        layer = (weight.t(), torch.zeros(V))
        screen = fast_decode.output_screen(fast_decode.PackedDecoder(None, 1.0, None, (), None, layer, 1, False, False))
        if screen is None:
            pytest.skip("the int8 screen does not apply here (kernels not built)")
        approx = _int8_logits(screen, hidden).double()
        error = (approx - hidden.double() @ screen.rows.double().t()).abs()
        ratio = error / _screen_bound(screen, hidden).double()
        assert 0.9 < float(ratio.max()) <= 1.0
        # in every row: each row's own step (a step for the whole batch would leave the 1e-3 row at 1e-4
        # of its bound; there the bias's fixed slack takes a share, 0.83 of the bound is reached)
        assert bool((ratio.amax(dim=1) > 0.8).all())


@needs_kernels
@pytest.mark.parametrize("E, V", [(32, 40), (128, 1000)])
def test_screened_pick_chooses_as_the_float32_logits_do(E, V, monkeypatch):
    weight_t, bias = _output_layer(E, V, seed=V)
    bias[:3] += 50.0  # the banned ids would win: the best of the rest is chosen
    layer = fast_decode.PackedDecoder(None, 1.0, None, (), None, (weight_t, bias), 1, False, False)
    screen = fast_decode.output_screen(layer)
    banned = torch.tensor([0, 1, 2])
    pick = native.greedy_pick_kernel().pick
    screened_rows = []
    real_kernel = native.GreedyPickKernel.screened
    half_steps = []
    monkeypatch.setattr(native.GreedyPickKernel, "screened", lambda self, *args: screened_rows.append(len(args[1]))
                        or half_steps.append(args[6]) or real_kernel(self, *args))
    for hidden in _hidden_states(96, E, seed=E):
        chosen = fast_decode.screened_pick(screen, hidden, banned)
        # each row's half step, as the bound the tests above check has it
        step = ((hidden.clamp(min=0).amax(dim=1) - hidden.clamp(max=0).amin(dim=1)) / 127).clamp(min=1e-30)
        torch.testing.assert_close(half_steps[-1], 0.5 * step * (1 + 1e-3), rtol=1e-6, atol=0)
        assert torch.equal(chosen, pick(torch.addmm(bias, hidden, weight_t), banned))
    assert screened_rows == [96] * 6 + [1, 96]  # every kind went through the screen
    # A row holding NaN or infinity: the kernel refuses the batch, which takes the float32 logits.
    hidden = torch.randn(8, E, generator=torch.Generator().manual_seed(1))
    hidden[2, 0], hidden[5, 1] = float("nan"), float("inf")
    expected = pick(torch.addmm(bias, hidden, weight_t), banned)
    assert torch.equal(fast_decode.screened_pick(screen, hidden, banned), expected)
    assert len(screened_rows) == 8  # the int8 product refused it: the screen never ran
    with pytest.raises(ValueError, match="float32 hidden states"):
        fast_decode.screened_pick(screen, hidden.double(), banned)


@needs_kernels
def test_a_screen_made_before_the_kernels_were_switched_off_takes_the_float32_logits(monkeypatch):
    weight_t, bias = _output_layer(32, 40, seed=3)
    screen = fast_decode.output_screen(fast_decode.PackedDecoder(None, 1.0, None, (), None, (weight_t, bias), 1,
                                                                 False, False))
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    banned = torch.tensor([0, 1, 2, 99])
    expected = torch.addmm(bias, hidden, weight_t).index_fill(1, torch.tensor([0, 1, 2]), float("-inf")).argmax(1)
    monkeypatch.setattr(native, "int8_output_kernel", lambda: None)
    monkeypatch.setattr(native, "greedy_pick_kernel", lambda: None)
    assert torch.equal(fast_decode.screened_pick(screen, hidden, banned), expected)


@pytest.fixture
def screen_every_step():
    """The screen runs at every step of a float32 greedy search where attnlab's kernels are built."""
    if native.greedy_pick_kernel() is None:
        pytest.skip("attnlab's compiled kernels could not be built here")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm_first, share", LAYOUTS, ids=LAYOUT_IDS)
def test_greedy_translation_through_the_screen_equals_the_module_reference(norm_first, share, seed,
                                                                          screen_every_step, monkeypatch):
    translator = Translator(_transformer(norm_first, share, seed), _Ids(), _Ids())
    screened = []
    real_pick = fast_decode.screened_pick
    monkeypatch.setattr(fast_decode, "screened_pick", lambda *args: screened.append(1) or real_pick(*args))
    config = DecodeConfig(beam_size=1, extra_len=10)
    sources = SOURCES + [[s + 3 * seed for s in source[:-1]] + [EOS] for source in SOURCES]
    lean = translator.translate_ids(sources, config)
    assert len(screened) == max(len(ids) for ids in lean) + 1  # every step chose through the screen
    assert lean == translator.translate_ids(sources, DecodeConfig(beam_size=1, extra_len=10, use_cache=False))


def test_the_screen_is_made_again_when_the_output_layer_changes(screen_every_step):
    """Training between translations changes the weights in place, possibly through ``.data`` (which
    PyTorch's version counter does not see): the translator compares its screen's copy with them."""
    model = _transformer(False, False)
    translator = Translator(model, _Ids(), _Ids())
    config = DecodeConfig(beam_size=1, extra_len=10)
    first = translator.translate_ids(SOURCES, config)
    screen = translator._output_screen()
    assert screen is not None and translator._output_screen() is screen  # kept while the weights stay
    with torch.no_grad():
        model.output.weight.data[:, :5] *= -3  # a different layer, unknown to the version counter
    assert translator._output_screen() is not screen
    changed = translator.translate_ids(SOURCES, config)
    assert changed == Translator(model, _Ids(), _Ids()).translate_ids(SOURCES, DecodeConfig(
        beam_size=1, extra_len=10, use_cache=False))
    assert changed != first  # the change mattered, so a stale screen would have been seen
    model.double()  # float64 weights equal in value to the screen's float32 copy: no screen, not a stale one
    assert translator._output_screen() is None
    assert translator.translate_ids(SOURCES, config) == translator.translate_ids(SOURCES, DecodeConfig(
        beam_size=1, extra_len=10, use_cache=False))
