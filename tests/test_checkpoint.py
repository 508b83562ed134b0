"""Checkpoints round-trip exactly, are written atomically, fail loudly when incomplete, never pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from helpers import tiny_transformer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import attnlab.store.checkpoint as checkpoint
from attnlab.data.vocab import CharVocab, vocabs_to_dict
from attnlab.decode.translate import DecodeConfig, Translator, load_translator
from attnlab.nn.model import Transformer, TransformerConfig
from attnlab.store.checkpoint import (
    CheckpointError,
    average_checkpoints,
    load_model_state,
    load_trainer_state,
    read_checkpoint_json,
    resolve_checkpoint,
    save_checkpoint,
    write_json_atomic,
)

SIZES = dict(num_heads=2, num_encoder_layers=1, num_decoder_layers=1, max_len=32, share_embeddings=True)


def make_model(seed: int) -> Transformer:
    """The shared tiny Transformer (vocabulary 40), one layer each side, embeddings shared."""
    return tiny_transformer(seed, **SIZES)


CONFIG = make_model(0).config
RUN_CONFIG = {"kind": "translation", "model": CONFIG.to_dict(), "train": {"seed": 1}}
VOCAB = {"src": {"kind": "test", "tokens": ["<pad>", "a"]}}


def save(directory: Path, model: Transformer, **trainer) -> Path:
    return save_checkpoint(directory, model, RUN_CONFIG, VOCAB, **trainer)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a directory (recursively) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.tensor([[5, 6, 7, 2, 0], [8, 9, 3, 0, 0]])
    tgt = torch.tensor([[1, 11, 12, 13], [1, 14, 15, 0]])
    return src, tgt


# -- round trip -----------------------------------------------------------------------------------
def test_round_trip_gives_identical_tensors_and_logits(tmp_path):
    saved, fresh = make_model(0), make_model(1)
    assert not torch.equal(saved.output.weight, fresh.output.weight)
    directory = save(tmp_path / "ckpt", saved)

    load_model_state(fresh, directory)

    for (name, a), (_, b) in zip(saved.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(saved(*batch()), fresh(*batch()))
    assert read_checkpoint_json(directory, "config.json") == RUN_CONFIG
    assert read_checkpoint_json(directory, "vocab.json") == VOCAB


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    directory = save(tmp_path / "ckpt", make_model(0))
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    tied = {"src_embed.embedding.weight", "tgt_embed.embedding.weight", "output.weight"}
    assert len(keys & tied) == 1
    assert keys | tied == set(make_model(0).state_dict())

    fresh = make_model(1)
    load_model_state(fresh, directory)
    assert fresh.output.weight is fresh.src_embed.embedding.weight is fresh.tgt_embed.embedding.weight
    with torch.no_grad():  # still one tensor: a change to the embedding shows in the output layer
        fresh.src_embed.embedding.weight[3, 0] = 42.0
    assert fresh.output.weight[3, 0].item() == 42.0


def test_weights_that_do_not_fit_raise(tmp_path):
    directory = save(tmp_path / "ckpt", make_model(0))
    other = Transformer(TransformerConfig(**{**CONFIG.to_dict(), "num_encoder_layers": 2}))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model_state(other, directory)


def test_trainer_state_round_trip(tmp_path):
    tensors = {"rng/torch": torch.get_rng_state(), "optim/w/step": torch.tensor(7.0)}
    info = {"step": 7, "epoch": 1, "batch": 3, "metrics": {"val_bleu": 1.5}}
    directory = save(tmp_path / "ckpt", make_model(0), trainer_tensors=tensors, trainer_info=info)
    loaded, loaded_info = load_trainer_state(directory)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert loaded_info == info


# -- atomic writing -------------------------------------------------------------------------------
def fail_on_save(monkeypatch, failing_call: int) -> list:
    """Make the ``failing_call``-th safetensors write raise OSError after writing; returns the calls."""
    real_save_file, calls = checkpoint.save_file, []

    def save_then_fail(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        calls.append(path)
        if len(calls) == failing_call:
            raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", save_then_fail)
    return calls


def test_writing_over_an_existing_checkpoint(tmp_path):
    directory = tmp_path / "ckpt" / "last"
    save(directory, make_model(0), trainer_info={"step": 1})
    newer = make_model(2)
    save(directory, newer)  # no trainer files this time: none of the old ones may linger

    fresh = make_model(1)
    load_model_state(fresh, directory)
    assert torch.equal(fresh.output.weight, newer.output.weight)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert [p.name for p in directory.parent.iterdir()] == ["last"]  # no temporary or old copies left


@pytest.mark.parametrize("failing_call", [1, 2])  # 1: the weights, 2: the trainer tensors
def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, failing_call):
    calls = fail_on_save(monkeypatch, failing_call)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "ckpt" / "new", make_model(0), trainer_tensors={"x": torch.ones(2)}, trainer_info={})
    assert len(calls) == failing_call
    assert list((tmp_path / "ckpt").iterdir()) == []


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_failed_write_keeps_the_existing_checkpoint(tmp_path, monkeypatch, failing_call):
    directory = save(tmp_path / "ckpt" / "last", make_model(0), trainer_tensors={"x": torch.ones(2)},
                     trainer_info={"step": 1})
    before = snapshot(directory)
    fail_on_save(monkeypatch, failing_call)
    with pytest.raises(OSError):
        save(directory, make_model(5), trainer_tensors={"x": torch.zeros(2)}, trainer_info={"step": 2})
    assert snapshot(directory) == before
    assert [p.name for p in directory.parent.iterdir()] == ["last"]
    fresh = make_model(1)
    load_model_state(fresh, directory)
    assert torch.equal(fresh.output.weight, make_model(0).output.weight)


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "checkpoints.json"
    write_json_atomic(path, {"last": "a"})
    write_json_atomic(path, {"last": "b", "name": "Zoë"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"last": "b", "name": "Zoë"}
    assert [p.name for p in path.parent.iterdir()] == ["checkpoints.json"]


# -- incomplete checkpoints -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "missing, load",
    [
        ("model.safetensors", lambda d: load_model_state(make_model(1), d)),
        ("config.json", lambda d: read_checkpoint_json(d, "config.json")),
        ("vocab.json", lambda d: read_checkpoint_json(d, "vocab.json")),
        ("trainer.safetensors", load_trainer_state),
        ("trainer.json", load_trainer_state),
    ],
)
def test_a_missing_file_raises_checkpoint_error_naming_it(tmp_path, missing, load):
    directory = save(tmp_path / "ckpt", make_model(0), trainer_tensors={"x": torch.ones(1)},
                     trainer_info={"step": 1})
    (directory / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.") + " is missing"):
        load(directory)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)  # the CLI reports ValueErrors in one line


# -- finding checkpoints --------------------------------------------------------------------------
def test_resolve_checkpoint_through_the_run_pointer(tmp_path):
    run = tmp_path / "run"
    for name in ("step-0000010", "step-0000020", "averaged"):
        save(run / "ckpt" / name, make_model(0))
    pointer = {"best": "ckpt/step-0000010", "last": "ckpt/step-0000020", "history": []}
    write_json_atomic(run / "checkpoints.json", pointer)

    assert resolve_checkpoint(run, "last") == run / "ckpt" / "step-0000020"
    assert resolve_checkpoint(run, "best") == run / "ckpt" / "step-0000010"
    assert resolve_checkpoint(run) == run / "ckpt" / "step-0000010"  # no exported model yet: the best
    write_json_atomic(run / "checkpoints.json", {**pointer, "model": "ckpt/averaged"})
    assert resolve_checkpoint(run) == run / "ckpt" / "averaged"
    assert resolve_checkpoint(run / "ckpt" / "step-0000020", "best") == run / "ckpt" / "step-0000020"


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)
    write_json_atomic(tmp_path / "checkpoints.json", {"history": []})
    with pytest.raises(CheckpointError, match="names no 'last' checkpoint"):
        resolve_checkpoint(tmp_path, "last")


# -- averaging ------------------------------------------------------------------------------------
def test_average_checkpoints_is_the_mean(tmp_path):
    models = [make_model(seed) for seed in (0, 1, 2)]
    dirs = [save(tmp_path / f"step-{i}", m) for i, m in enumerate(models)]
    averaged = average_checkpoints(dirs)

    states = [m.state_dict() for m in models]
    assert set(averaged) <= set(states[0])
    for name, tensor in averaged.items():
        expected = torch.stack([s[name] for s in states]).double().mean(0).float()
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
    # loading the average re-ties the shared weights like any checkpoint
    target = make_model(9)
    target.load_state_dict(averaged, strict=False)
    assert torch.equal(target.output.weight, averaged["src_embed.embedding.weight"])


def test_average_of_one_is_itself_and_of_none_raises(tmp_path):
    model = make_model(0)
    directory = save(tmp_path / "a", model)
    averaged = average_checkpoints([directory])
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in averaged.items())
    with pytest.raises(CheckpointError, match="no checkpoints"):
        average_checkpoints([])


def test_average_refuses_different_models(tmp_path):
    a = save(tmp_path / "a", make_model(0))
    b = save_checkpoint(tmp_path / "b", torch.nn.Linear(2, 2), RUN_CONFIG, VOCAB)
    with pytest.raises(CheckpointError, match="different tensors"):
        average_checkpoints([a, b])


# -- nothing is unpickled -------------------------------------------------------------------------
def test_checkpoints_hold_only_safetensors_and_json_and_load_without_pickle(tmp_path, monkeypatch):
    model = make_model(0)
    directory = save(tmp_path / "ckpt", model, trainer_tensors={"rng/torch": torch.get_rng_state()},
                     trainer_info={"step": 3})
    suffixes = {p.suffix for p in directory.iterdir()}
    assert suffixes == {".safetensors", ".json"}

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, no_unpickling)
    fresh = make_model(1)
    load_model_state(fresh, directory)
    load_trainer_state(directory)
    read_checkpoint_json(directory, "config.json")
    average_checkpoints([directory])
    assert torch.equal(fresh.output.weight, model.output.weight)


# -- checkpoints written before W_q, W_k and W_v were fused ---------------------------------------
def _separate_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the layout of earlier checkpoints: each attention's W_q, W_k, W_v apart."""
    old = {}
    for name, tensor in state.items():
        if name.endswith(("in_proj_weight", "in_proj_bias")):
            prefix, kind = name.rsplit(".in_proj_", 1)
            for part, piece in zip("qkv", tensor.chunk(3)):
                old[f"{prefix}.w_{part}.{kind}"] = piece.contiguous()
        else:
            old[name] = tensor
    return old


def test_a_checkpoint_with_separate_projections_loads_and_translates(tmp_path):
    vocab = CharVocab.build("ein Hund läuft. a dog runs.")
    model = tiny_transformer(4, vocab=len(vocab), max_len=24)
    with torch.no_grad():  # non-zero biases, so that a bias loaded into the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    run_config = {"kind": "translation", "model": model.config.to_dict(), "train": {}}
    directory = save_checkpoint(tmp_path / "old", model, run_config, vocabs_to_dict(vocab, vocab))
    weights = directory / "model.safetensors"
    old = _separate_projections(load_file(str(weights)))
    assert "encoder_layers.0.self_attn.w_q.weight" in old and not any("in_proj" in k for k in old)
    save_file(old, str(weights))

    translator = load_translator(directory)
    src, tgt = torch.tensor([[5, 6, 7, 2, 0]]), torch.tensor([[1, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(translator.model(src, tgt), model.eval()(src, tgt), rtol=0, atol=0)
    sentences = ["ein Hund", "läuft."]
    config = DecodeConfig(beam_size=2, extra_len=5)
    assert translator.translate(sentences, config) == Translator(model, vocab, vocab).translate(sentences, config)
    averaged = average_checkpoints([directory, directory])  # old layouts average, and load, too
    fresh = tiny_transformer(9, vocab=len(vocab), max_len=24)
    fresh.load_state_dict(averaged, strict=True)
    assert torch.equal(fresh.encoder_layers[0].self_attn.in_proj_weight,
                       model.encoder_layers[0].self_attn.in_proj_weight)


def test_translator_refuses_a_bare_string_and_translates_nothing_to_nothing():
    vocab = CharVocab.build("ein Hund")
    translator = Translator(tiny_transformer(0, vocab=len(vocab)), vocab, vocab)
    with pytest.raises(ValueError, match=r"pass a list of sentences, e\.g\. \['Ein Hund\.'\]"):
        translator.translate("Ein Hund.")
    with pytest.raises(ValueError, match="pass a list of sentences"):
        translator.encode_source("Ein Hund.")
    assert translator.translate_ids([]) == []
    assert translator.translate([]) == [] and translator.translate(["", " "]) == ["", ""]


def test_translating_runs_in_evaluation_mode_and_gives_the_model_back_as_it_was():
    vocab = CharVocab.build("ein Hund läuft.")
    model = tiny_transformer(2, vocab=len(vocab), dropout=0.5, train=True)
    translator = Translator(model, vocab, vocab)
    assert model.training  # building a Translator changes nothing
    config = DecodeConfig(beam_size=1, extra_len=6)
    sources = translator.encode_source(["ein Hund", "läuft"])
    in_training = translator.translate_ids(sources, config)
    assert model.training
    assert in_training == Translator(model.eval(), vocab, vocab).translate_ids(sources, config)
    assert not model.training
