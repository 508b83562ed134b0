"""The CTranslate2 export computes what attnlab computes: teacher-forced log-probabilities within 1e-4,
greedy and beam outputs identical, for post-LN and pre-LN, shared and separate vocabularies; the
command line writes a model CTranslate2 loads, and every bad input is a one-line error."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import cli, randomize_norms_, tiny_language_model, tiny_transformer

from attnlab.data.corpus import load_multi30k
from attnlab.data.vocab import CharVocab, Vocab, vocabs_to_dict
from attnlab.decode.export import (
    _attnlab_choice,
    export_ctranslate2,
    exported_vocabs,
    search_like_attnlab,
)
from attnlab.decode.translate import DecodeConfig, Translator
from attnlab.errors import ConfigError
from attnlab.store.checkpoint import save_checkpoint

ctranslate2 = pytest.importorskip(
    "ctranslate2", reason="ctranslate2 is not installed (pip install 'attnlab[ctranslate2]'; make test installs it)"
)

PAIRS = load_multi30k("val", "de", "en")[:300]
MAX_LEN = 192  # positions of the test models: the small BPE vocabularies split a sentence into up to 130 tokens
SOURCES = [de for de, _ in PAIRS]
TARGETS = [en for _, en in PAIRS]


@pytest.fixture(scope="module", autouse=True)
def threads(one_thread):
    """One thread for attnlab (the conftest fixture) and for CTranslate2 (``intra_threads=1``)."""


@pytest.fixture(scope="module")
def shared_vocab() -> Vocab:
    return Vocab.train(SOURCES + TARGETS, 400)


@pytest.fixture(scope="module")
def separate_vocabs() -> tuple[Vocab, Vocab]:
    return Vocab.train(SOURCES, 360), Vocab.train(TARGETS, 330)


SHARPER = 4.0  # the decoder's last LayerNorm's γ is multiplied by this


def random_model(seed: int, src_vocab: Vocab, tgt_vocab: Vocab, **overrides):
    """The tests' tiny Transformer with non-trivial LayerNorms and biases, so that any weight put in
    the wrong place, or left out, changes the numbers.

    Its output distributions are made sharper (``SHARPER``), as a trained model's are: the flat
    ones of random weights make beams of hypotheses whose scores differ by 1e-5, where float32
    rounding alone decides. Like a trained model, it also gives <bos> and <pad> (never a target in
    training) a negligible probability: both searches never pick them, but attnlab bans them after
    the softmax and CTranslate2 (``suppress_sequences``) before it, so with the 0.5% that a random
    model gives them the beams' scores would differ by that share at every step.
    """
    model = tiny_transformer(seed, src_vocab_size=len(src_vocab), tgt_vocab_size=len(tgt_vocab), max_len=MAX_LEN,
                             **overrides)
    generator = torch.Generator().manual_seed(seed)
    randomize_norms_(model, generator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
        model.output.bias[[tgt_vocab.bos_id, tgt_vocab.pad_id]] = -30.0
        final_norm = model.decoder_norm if model.config.norm_first else model.decoder_layers[-1].norm3
        final_norm.weight.mul_(SHARPER)
    return model.eval()


def write_run(directory: Path, model, src_vocab, tgt_vocab) -> Path:
    config = {"kind": "translation", "model": model.config.to_dict(),
              "train": {"task": {"kind": "translation", "src_lang": "de", "tgt_lang": "en"}}}
    return save_checkpoint(directory, model, config, vocabs_to_dict(src_vocab, tgt_vocab))


CASES = {  # name -> (norm_first, vocabulary, share_embeddings)
    "post-LN, shared vocabulary, tied embeddings": (False, "shared", True),
    "pre-LN, shared vocabulary, tied embeddings": (True, "shared", True),
    "post-LN, shared vocabulary, separate embeddings": (False, "shared", False),
    "pre-LN, separate vocabularies": (True, "separate", False),
    "post-LN, separate vocabularies": (False, "separate", False),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, shared_vocab, separate_vocabs, tmp_path_factory):
    """(attnlab Translator, CTranslate2 Translator, model directory) of one case of ``CASES``."""
    norm_first, vocabulary, share = CASES[request.param]
    src_vocab, tgt_vocab = (shared_vocab, shared_vocab) if vocabulary == "shared" else separate_vocabs
    seed = list(CASES).index(request.param)
    model = random_model(seed, src_vocab, tgt_vocab, norm_first=norm_first, share_embeddings=share)
    folder = tmp_path_factory.mktemp("export")
    out = export_ctranslate2(write_run(folder / "ckpt", model, src_vocab, tgt_vocab), folder / "ct2")
    ours = Translator(model, src_vocab, tgt_vocab)
    theirs = ctranslate2.Translator(str(out), device="cpu", inter_threads=1, intra_threads=1)
    return ours, theirs, out


def source_tokens(out: Path, sentences: list[str]) -> list[list[str]]:
    src_vocab, _ = exported_vocabs(out)
    return [src_vocab.tokens(s) for s in sentences]


def as_tokens(translator: Translator, outputs: list[list[int]]) -> list[list[str]]:
    return [[translator.tgt_vocab.id_to_token(i) for i in ids] for ids in outputs]


def share_identical(ours: list, theirs: list) -> float:
    assert len(ours) == len(theirs)
    return sum(a == b for a, b in zip(ours, theirs)) / len(ours)


# -- equivalence ------------------------------------------------------------------------------------
def test_the_model_directory_holds_the_model_its_vocabularies_and_tokenizers(exported):
    ours, _, out = exported
    shared = ours.src_vocab is ours.tgt_vocab
    vocab_files = ["shared_vocabulary.json"] if shared else ["source_vocabulary.json", "target_vocabulary.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.bin", "config.json", "source_tokenizer.json", "target_tokenizer.json", "attnlab_export.json",
         *vocab_files])
    for name, vocab in zip(vocab_files, (ours.src_vocab, ours.tgt_vocab)):
        assert json.loads((out / name).read_text(encoding="utf-8")) == [vocab.id_to_token(i) for i in range(len(vocab))]
    src_vocab, tgt_vocab = exported_vocabs(out)
    assert src_vocab == ours.src_vocab and tgt_vocab == ours.tgt_vocab
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["decoder_start_token"]) == ("<bos>", "<eos>", "<bos>")
    assert config["add_source_eos"] is True and config["layer_norm_epsilon"] == pytest.approx(1e-5)
    info = json.loads((out / "attnlab_export.json").read_text())
    assert (info["source_language"], info["target_language"], info["max_positions"]) == ("de", "en", MAX_LEN)


def test_teacher_forced_log_probabilities_are_attnlabs(exported):
    ours, theirs, out = exported
    sources, targets = SOURCES[:60], TARGETS[:60]
    tgt_vocab = ours.tgt_vocab
    scored = theirs.score_batch(source_tokens(out, sources), [tgt_vocab.tokens(t) for t in targets])
    worst = 0.0
    with torch.no_grad():
        for source, target, result in zip(sources, targets, scored):
            src = torch.tensor(ours.encode_source([source]))  # (1, S), with EOS
            ids = tgt_vocab.encode(target)
            tgt_in = torch.tensor([[tgt_vocab.bos_id, *ids]])  # (1, T)
            gold = torch.tensor([*ids, tgt_vocab.eos_id])  # (T,)
            log_probs = ours.model(src, tgt_in)[0].log_softmax(-1)  # (T, V)
            expected = log_probs[torch.arange(len(gold)), gold]
            assert result.tokens == [*tgt_vocab.tokens(target), "<eos>"]
            assert len(result.log_probs) == len(gold)
            worst = max(worst, (torch.tensor(result.log_probs) - expected).abs().max().item())
    assert worst <= 1e-4


@pytest.mark.parametrize("beam", [1, 4])
def test_outputs_are_attnlabs(exported, beam):
    ours, theirs, out = exported
    sentences = SOURCES[:150] if beam == 1 else SOURCES[:100]
    expected = as_tokens(ours, ours.translate_ids(ours.encode_source(sentences), DecodeConfig(beam_size=beam)))
    got = search_like_attnlab(theirs, source_tokens(out, sentences), max_positions=MAX_LEN, beam_size=beam)
    assert share_identical(expected, got) >= 0.99
    limits = [min(len(s) + 50, MAX_LEN - 2) for s in source_tokens(out, sentences)]
    assert any(len(e) == limit for e, limit in zip(expected, limits))  # random weights: some run to the limit


@pytest.mark.parametrize("beam", [1, 3])
def test_each_sentence_keeps_its_own_length_limit(exported, beam):
    """With extra_len 2 most outputs stop at their own limit, source length + 1 tokens: sentences
    of different lengths, decoded in one CTranslate2 call, each get theirs."""
    ours, theirs, out = exported
    sentences = SOURCES[:40]
    config = DecodeConfig(beam_size=beam, alpha=1.0, extra_len=2)
    expected = as_tokens(ours, ours.translate_ids(ours.encode_source(sentences), config))
    got = search_like_attnlab(theirs, source_tokens(out, sentences), max_positions=MAX_LEN, beam_size=beam, alpha=1.0,
                              extra_len=2)
    assert share_identical(expected, got) >= 0.99
    limits = {len(s) + 1 for s in source_tokens(out, sentences)}
    assert len({len(e) for e in expected} & limits) >= 3


def result(*hypotheses: tuple[list[str], float], power: float) -> SimpleNamespace:
    """A CTranslate2 result from (tokens, log-probability) pairs, scored as it scores them."""
    return SimpleNamespace(hypotheses=[h for h, _ in hypotheses],
                           scores=[logp * len(h) ** power for h, logp in hypotheses])


def test_the_choice_among_finished_hypotheses_is_attnlabs():
    """Hand-computed: beam 2, alpha 1. attnlab's search keeps the first two to finish; the scores are
    logp / ((5 + n) / 6) with n the tokens and the EOS."""
    short = (["a", "<eos>"], -1.4)  # step 1: 1.4 / (7/6) = 1.2
    longer = (["a", "b", "c", "<eos>"], -1.7)  # step 3: 1.7 / (9/6) = 1.133...: the best
    longer_worse = (["a", "b", "d", "<eos>"], -1.8)  # step 3 as well, but below `longer`: dropped
    late_best = (["x", "y", "z", "w", "<eos>"], -0.1)  # finished after two others had: never kept
    assert _attnlab_choice(result(short, longer, longer_worse, late_best, power=3.0), 3.0, 2, 1.0) == ["a", "b", "c"]
    # A hypothesis cut at the length limit (no EOS) ends one step after those that ended with EOS
    # on the same step: here `ended` is kept (the second to finish) and the cut one is not.
    ended = (["p", "q", "<eos>"], -1.2)  # 1.2 / (8/6) = 0.9
    cut = (["p", "q", "r"], -0.5)  # would be 0.5 / (9/6) = 0.33: better, but third to finish
    assert _attnlab_choice(result(cut, short, ended, power=3.0), 3.0, 2, 1.0) == ["p", "q"]
    # An empty translation: EOS first.
    assert _attnlab_choice(result((["<eos>"], -0.2), (["a", "<eos>"], -3.0), power=2.0), 2.0, 2, 0.6) == []


def test_an_int8_export_is_the_float32_export_quantized_on_loading(exported, tmp_path):
    """``--quantization int8`` stores what CTranslate2 computes when it loads the float32 model with
    ``compute_type="int8"``, in less than half the space."""
    ours, _, out = exported
    checkpoint = write_run(tmp_path / "ckpt", ours.model, ours.src_vocab, ours.tgt_vocab)
    int8 = export_ctranslate2(checkpoint, tmp_path / "int8", quantization="int8")
    assert (int8 / "model.bin").stat().st_size < 0.5 * (out / "model.bin").stat().st_size
    assert json.loads((int8 / "attnlab_export.json").read_text())["quantization"] == "int8"
    stored = ctranslate2.Translator(str(int8), compute_type="int8", intra_threads=1)
    on_loading = ctranslate2.Translator(str(out), compute_type="int8", intra_threads=1)
    sources, targets = source_tokens(out, SOURCES[:10]), [ours.tgt_vocab.tokens(t) for t in TARGETS[:10]]
    for a, b in zip(stored.score_batch(sources, targets), on_loading.score_batch(sources, targets)):
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), rtol=0, atol=1e-5)


# -- the command line -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_vocab) -> tuple[Path, Translator]:
    model = random_model(7, shared_vocab, shared_vocab, share_embeddings=True)
    folder = tmp_path_factory.mktemp("cli-export")
    return write_run(folder / "ckpt", model, shared_vocab, shared_vocab), Translator(model, shared_vocab, shared_vocab)


def test_export_command_writes_a_model_that_translates_as_attnlab(run, tmp_path, capsys):
    checkpoint, ours = run
    out = tmp_path / "ct2"
    code, stdout, err = cli(["export", "--format", "ctranslate2", "--checkpoint", checkpoint, "--out", out], capsys)
    assert code == 0, err
    assert stdout == f"wrote the CTranslate2 model, its vocabularies and tokenizers to {out}\n"
    theirs = ctranslate2.Translator(str(out), intra_threads=1)
    sentences = SOURCES[:20]
    src_vocab, tgt_vocab = exported_vocabs(out)
    got = search_like_attnlab(theirs, [src_vocab.tokens(s) for s in sentences], max_positions=MAX_LEN, beam_size=4)
    texts = [tgt_vocab.decode([tgt_vocab.token_to_id(t) for t in tokens]) for tokens in got]
    expected = ours.translate(sentences, DecodeConfig(beam_size=4))
    assert share_identical(expected, texts) >= 0.95 and any(texts)

    stamp = (out / "model.bin").stat().st_mtime_ns
    code, _, err = cli(["export", "--format", "ctranslate2", "--checkpoint", checkpoint, "--out", out], capsys)
    assert code == 2 and err == f"attnlab export: error: {out} already exists; pass --force to replace it\n"
    assert (out / "model.bin").stat().st_mtime_ns == stamp  # left alone
    code, _, err = cli(["export", "--format", "ctranslate2", "--checkpoint", checkpoint, "--out", out, "--force"],
                       capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["ct2"]  # no temporary folder left behind


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("attnlab export: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = cli(["export", "--format", "ctranslate2", "--checkpoint", missing, "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, str(missing))
    assert not (tmp_path / "o").exists()


def test_a_language_model_is_refused_in_one_line(tmp_path, capsys):
    vocab = CharVocab.build("to be or not to be")
    model = tiny_language_model(0, vocab=len(vocab))
    checkpoint = save_checkpoint(tmp_path / "lm", model, {"kind": "lm", "model": model.config.to_dict(), "train": {}},
                                 vocabs_to_dict(vocab, vocab))
    code, _, err = cli(["export", "--format", "ctranslate2", "--checkpoint", checkpoint, "--out", tmp_path / "o"],
                       capsys)
    one_line_error(code, err, "language model", "translation model")
    assert not (tmp_path / "o").exists()


def test_a_character_vocabulary_is_refused_in_one_line(tmp_path, capsys):
    vocab = CharVocab.build("ein Hund läuft. a dog runs.")
    model = tiny_transformer(0, vocab=len(vocab))
    checkpoint = write_run(tmp_path / "ckpt", model, vocab, vocab)
    code, _, err = cli(["export", "--format", "ctranslate2", "--checkpoint", checkpoint, "--out", tmp_path / "o"],
                       capsys)
    one_line_error(code, err, "vocab.json", "'char'", "BPE")


def test_an_unknown_quantization_is_a_one_line_error(run, tmp_path, capsys):
    checkpoint, _ = run
    code, _, err = cli(["export", "--format", "ctranslate2", "--checkpoint", checkpoint, "--out", tmp_path / "o",
                        "--quantization", "int3"], capsys)
    one_line_error(code, err, "--quantization 'int3'", "int8")


def test_an_unknown_format_is_a_usage_error(run, tmp_path, capsys):
    checkpoint, _ = run
    code, _, err = cli(["export", "--format", "onnx", "--checkpoint", checkpoint, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "invalid choice: 'onnx'" in err and err.count("\n") == 1


def test_without_ctranslate2_the_error_says_how_to_install_it(run, tmp_path, monkeypatch):
    checkpoint, _ = run
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'attnlab\[ctranslate2\]'"):
        export_ctranslate2(checkpoint, tmp_path / "o")
