"""Translation training on a user's own prepared data: the path every corpus, Multi30k included, takes.

A user's French->German corpus is made by copying bundled Multi30k sentences into plain files
(``train.fr`` / ``train.de`` ...), as a user's own data would be; no preset or Multi30k code reads it.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from helpers import small_config

from attnlab.data.batching import collate
from attnlab.data.corpus import load_multi30k
from attnlab.data.prepared import PreparedData, prepare
from attnlab.errors import DataError
from attnlab.train.tasks import TranslationTask, build_task
from attnlab.train.trainer import resume, train

PAIRS = 600


def write_corpus(folder, split: str, pairs: list[tuple[str, str]], *, gz: bool = False) -> str:
    """``folder/split.fr`` and ``folder/split.de`` (gzipped if asked); returns the prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    for side, lang in ((0, "fr"), (1, "de")):
        text = "".join(pair[side] + "\n" for pair in pairs)
        path = folder / f"{split}.{lang}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return str(folder / split)


@pytest.fixture(scope="module")
def fr_de(tmp_path_factory):
    """A prepared fr->de dataset from plain files: 600 training pairs, 60 validation, one test set
    (no length-ratio cleaning, so that training pair i is line i)."""
    root = tmp_path_factory.mktemp("fr-de")
    train_pairs = load_multi30k("train", "fr", "de")[:PAIRS]
    valid_pairs = load_multi30k("val", "fr", "de")[:60]
    test_pairs = load_multi30k("test_2016_flickr", "fr", "de")[:40]
    prepare(train=write_corpus(root / "corpus", "train", train_pairs),
            valid=write_corpus(root / "corpus", "valid", valid_pairs, gz=True),
            tests={"flickr": write_corpus(root / "corpus", "test", test_pairs)},
            out=root / "prepared", src_lang="fr", tgt_lang="de", vocab_size=400, shared_vocab=False, max_ratio=100.0,
            progress=False)
    return root / "prepared", train_pairs


def own_config(data, **changes):
    return small_config(data=str(data), train_fraction=1.0, max_tokens=600, **changes)


def test_prepared_data_sets_the_languages_and_vocabulary(fr_de):
    data, _ = fr_de
    task = build_task(own_config(data))
    assert (task.config.task.src_lang, task.config.task.tgt_lang) == ("fr", "de")  # completed from the data
    assert task.config.task.shared_vocab is False and task.src_vocab is not task.tgt_vocab
    assert task.config.task.vocab_size == 400 and task.config.task.data == str(data.resolve())
    prepared = PreparedData.open(data)
    assert (task.src_vocab, task.tgt_vocab) == (prepared.src_vocab, prepared.tgt_vocab)
    assert task.describe().startswith(f"{data} fr->de: ")
    assert task.data_info() == {"path": str(data.resolve()), "fingerprint": prepared.fingerprint}


def test_memory_mapped_batches_equal_batches_built_in_memory(fr_de):
    """Every batch read through the memory map equals the same pairs encoded and padded in memory."""
    data, pairs = fr_de
    task = build_task(own_config(data))
    assert len(task.train_split) == PAIRS  # nothing was cleaned away, so pair i is line i
    src_vocab, tgt_vocab = task.src_vocab, task.tgt_vocab
    seen = []
    for batch in task.batches(0):
        lines = task.train_index[batch].tolist()
        expected = collate([(src_vocab.encode(pairs[i][0]) + [src_vocab.eos_id],
                             [tgt_vocab.bos_id] + tgt_vocab.encode(pairs[i][1]) + [tgt_vocab.eos_id])
                            for i in lines], task.pad_id)
        got = task.to_tensors(batch, torch.device("cpu"))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        seen += lines
    assert sorted(seen) == task.train_index.tolist()


def test_pairs_longer_than_the_model_are_left_out_and_counted(fr_de):
    data, pairs = fr_de
    task = build_task(own_config(data, max_len=28))
    vocab = task.src_vocab
    fits = [len(task.src_vocab.encode(s)) + 1 <= 28 and len(task.tgt_vocab.encode(t)) + 2 <= 28 for s, t in pairs]
    assert task.train_index.tolist() == [i for i, ok in enumerate(fits) if ok]
    assert task.dropped == PAIRS - sum(fits) > 0
    assert f"({task.dropped} longer than max_len=28 left out)" in task.describe()
    assert vocab is task.src_vocab
    with pytest.raises(DataError, match="no training pair fits max_len=2"):
        build_task(own_config(data, max_len=2))


def test_a_run_on_prepared_data_records_it_and_refuses_other_data_on_resume(fr_de, tmp_path):
    data, _ = fr_de
    run = tmp_path / "run"
    train(own_config(data, max_steps=4, eval_every=4, eval_sentences=5), run, progress=False, echo=lambda _m: None)
    saved = json.loads((run / "ckpt" / "step-0000004" / "config.json").read_text())
    assert saved["data"]["fingerprint"] == PreparedData.open(data).fingerprint
    assert saved["train"]["task"]["src_lang"] == "fr" and saved["train"]["task"]["data"] == str(data.resolve())

    # The same files prepared with other cleaning: the same vocabulary, other pairs. Resuming the run
    # on that folder must not go on training as if nothing had changed.
    other = tmp_path / "other"
    corpus = data.parent / "corpus"
    prepare(train=str(corpus / "train"), valid=str(corpus / "valid"), tests={"flickr": str(corpus / "test")},
            out=other, src_lang="fr", tgt_lang="de", vocab_size=400, shared_vocab=False, max_ratio=1.5,
            progress=False)
    assert PreparedData.open(other).src_vocab == PreparedData.open(data).src_vocab
    config_file = run / "ckpt" / "step-0000004" / "config.json"
    saved["train"]["task"]["data"] = str(other)
    config_file.write_text(json.dumps(saved))
    with pytest.raises(DataError, match=f"{other}: this prepared data is not the data the run in {run} was trained on"):
        resume(run, max_steps=6, progress=False, echo=lambda _m: None)


def test_a_checkpoint_vocabulary_must_match_the_data(fr_de):
    data, _ = fr_de
    task = build_task(own_config(data))
    wrong = TranslationTask(small_config()).vocab_json()  # Multi30k de-en's vocabulary
    with pytest.raises(DataError, match="vocabulary is not the one this run was trained with"):
        build_task(own_config(data), vocab=wrong)
    assert isinstance(build_task(own_config(data), vocab=task.vocab_json()), TranslationTask)


def test_multi30k_presets_read_the_same_prepared_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    task = build_task(small_config())
    assert task.data.path.parent == tmp_path / "cache" / "prepared"
    assert task.data.split_names == ("train", "valid", "test_2016_flickr")
    assert len(task.val) == 1014 and task.val[0] == load_multi30k("val", "de", "en")[0]
    written = {f.name: f.stat().st_mtime_ns for f in task.data.path.iterdir()}
    again = build_task(small_config())  # found in the cache, not prepared twice
    assert {f.name: f.stat().st_mtime_ns for f in again.data.path.iterdir()} == written
    assert again.data.fingerprint == task.data.fingerprint
    assert np.array_equal(again.train_index, task.train_index)


def test_no_validation_pair_that_fits_is_an_error_not_a_perfect_loss(fr_de):
    data, _ = fr_de
    with pytest.raises(DataError, match="no (training|validation) pair fits max_len=6"):
        build_task(own_config(data, max_len=6))


def test_edited_arrays_are_refused_before_training(fr_de, tmp_path):
    import shutil

    data, _ = fr_de
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    ids = copy / "train.tgt.ids.bin"
    raw = bytearray(ids.read_bytes())
    raw[10] ^= 1  # same size, one token changed
    ids.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train.tgt.ids.bin"):
        build_task(own_config(copy))
