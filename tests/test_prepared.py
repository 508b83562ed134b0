"""Prepared datasets: the prefix/TSV readers, cleaning counts, deterministic and incremental
preparation, arrays that decode back to the cleaned corpus, and every error naming its file."""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from attnlab.app import prepare as prepare_cli
from attnlab.data.prepared import MANIFEST, PreparedData, prepare
from attnlab.data.sources import count_lines, resolve_source
from attnlab.errors import ConfigError, DataError

WORDS = "red blue cat dog sits runs the a big small old new".split()
SMALL = dict(vocab_size=300, max_len=20, progress=False, workers=0)


def write_lines(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_prefix(folder: Path, name: str, pairs: list[tuple[str, str]], gz: bool = False) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_lines(folder / f"{name}.en{ext}", [s for s, _ in pairs])
    write_lines(folder / f"{name}.cs{ext}", [t for _, t in pairs])
    return str(folder / name)


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> str:
    write_lines(path, [f"{s}\t{t}" for s, t in pairs])
    return str(path)


def normal_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Distinct copy pairs (target = source) of 2-6 words: ratio 1, well under max_len 20."""
    rng, seen = random.Random(seed), set()
    while len(seen) < n:
        seen.add(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))))
    return [(s, s) for s in sorted(seen)]


def crafted_train() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(the corpus, the pairs cleaning must keep): 3 empty, 3 duplicates, 2 too long, 2 bad ratio.

    Subwords never span a space, so 30 words are >= 30 subwords (over max_len 20), and 8 words
    against the single letter "x" (<= 2 subwords) is a ratio >= 4 (over 1.5).
    """
    keep = normal_pairs(30)
    long_text = " ".join(WORDS * 3)[:200]
    corpus = [
        *keep[:10], ("", "red cat"), keep[0], ("big dog", ""), (long_text, long_text), keep[3],
        *keep[10:20], ("   ", "  "), (" ".join(WORDS[:8]), "x"), keep[0], (long_text + " dog", long_text),
        *keep[20:], ("x", " ".join(WORDS[2:10])),
    ]
    return corpus, keep


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("corpus")
    train, kept = crafted_train()
    valid = normal_pairs(8, seed=1) + [("", "blue"), (" ".join(WORDS * 3), "red"), ("cat dog red big", "x")]
    test = normal_pairs(5, seed=2) + [("old", "")]
    return {
        "train": write_prefix(folder, "train", train), "valid": write_prefix(folder, "valid", valid),
        "test": write_prefix(folder, "test", test, gz=True), "train_pairs": train, "kept": kept,
        "valid_pairs": valid, "test_pairs": test, "folder": folder,
    }


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    report = prepare(train=corpus["train"], valid=corpus["valid"], tests={"t1": corpus["test"]}, out=out,
                     src_lang="en", tgt_lang="cs", dedup=True, **SMALL)
    return out, report


# -- readers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_prefix_reader_pairs_lines_and_strips(tmp_path, gz):
    ext = ".gz" if gz else ""
    (tmp_path / f"p.en{ext}").write_bytes((gzip.compress if gz else bytes)(b"\xef\xbb\xbf Hello \n\nlast"))
    write_lines(tmp_path / f"p.cs{ext}", ["Ahoj", "x", " konec\u2028!"])
    source = resolve_source(tmp_path / "p", "en", "cs")
    assert source.kind == "prefix" and source.count_pairs() == 3
    assert list(source.pairs()) == [("Hello", "Ahoj"), ("", "x"), ("last", "konec\u2028!")]


@pytest.mark.parametrize("name", ["d.tsv", "d.tsv.gz"])
def test_tsv_reader_splits_on_the_one_tab(tmp_path, name):
    write_lines(tmp_path / name, ["Hello \t Ahoj", "a b\t", "\u00e9t\u00e9\tl\u00e9to"])
    source = resolve_source(tmp_path / name, "en", "cs")
    assert source.kind == "tsv" and source.count_pairs() == 3
    assert list(source.pairs()) == [("Hello", "Ahoj"), ("a b", ""), ("\u00e9t\u00e9", "l\u00e9to")]


def test_count_lines_counts_a_last_line_without_newline(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\ntwo")
    (tmp_path / "b.txt").write_bytes(b"")
    assert count_lines(tmp_path / "a.txt") == 2 and count_lines(tmp_path / "b.txt") == 0


@pytest.mark.parametrize("tabs", [0, 2])
def test_tsv_line_without_exactly_one_tab_names_file_and_line(tmp_path, tabs):
    path = write_lines(tmp_path / "bad.tsv", ["a\tb", "c\td", "x" + "\ty" * tabs])
    with pytest.raises(DataError, match=rf"bad\.tsv, line 3: expected source<TAB>target \(one tab\), found {tabs}"):
        list(resolve_source(path, "en", "cs").pairs())


def test_invalid_utf8_names_file_and_line(tmp_path):
    write_lines(tmp_path / "u.cs", ["a", "b"])
    (tmp_path / "u.en").write_bytes(b"ok\nbad \xff\n")
    with pytest.raises(DataError, match=r"u\.en, line 2: invalid UTF-8"):
        list(resolve_source(tmp_path / "u", "en", "cs").pairs())


def test_missing_and_ambiguous_prefix_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"--train .*nowhere\.en \(or nowhere\.en\.gz\): no such file"):
        resolve_source(tmp_path / "nowhere", "en", "cs", flag="--train")
    with pytest.raises(DataError, match=r"gone\.tsv: no such file"):
        resolve_source(tmp_path / "gone.tsv", "en", "cs")
    write_lines(tmp_path / "p.en", ["a"])
    write_lines(tmp_path / "p.en.gz", ["a"])
    write_lines(tmp_path / "p.cs", ["b"])
    with pytest.raises(DataError, match=r"both .*p\.en and .*p\.en\.gz exist"):
        resolve_source(tmp_path / "p", "en", "cs")


def test_misaligned_prefix_names_both_files_and_counts(tmp_path):
    write_lines(tmp_path / "m.en", ["a", "b", "c"])
    write_lines(tmp_path / "m.cs", ["a", "b"])
    with pytest.raises(DataError, match=r"line counts differ: .*m\.en has 3 lines, .*m\.cs has 2"):
        prepare(train=tmp_path / "m", valid=tmp_path / "m", out=tmp_path / "o", src_lang="en", tgt_lang="cs", **SMALL)


# -- cleaning and the arrays -------------------------------------------------------------------------


def test_cleaning_counts_each_rule(prepared):
    out, report = prepared
    train, valid, test = (report.splits[n] for n in ("train", "valid", "t1"))
    assert (train.read, train.kept) == (40, 30)
    assert train.dropped == {"empty": 3, "duplicate": 3, "too_long": 2, "ratio": 2}
    assert (valid.read, valid.kept, valid.dropped) == (11, 9, {"empty": 1, "too_long": 1})
    assert (test.read, test.kept, test.dropped) == (6, 6, {})
    stored = json.loads((out / "report.json").read_text())
    assert stored["splits"]["train"]["dropped"] == train.dropped
    assert "ratio 2" in report.summary() and "duplicate 3" in report.summary()


def test_duplicates_are_kept_without_dedup(corpus, tmp_path):
    report = prepare(train=corpus["train"], valid=corpus["valid"], out=tmp_path / "d", src_lang="en",
                     tgt_lang="cs", **SMALL)
    assert (report.splits["train"].kept, report.splits["train"].dropped) == (
        33, {"empty": 3, "too_long": 2, "ratio": 2})


def test_arrays_decode_back_to_the_encodings_of_the_cleaned_pairs(prepared, corpus):
    out, _ = prepared
    data = PreparedData.open(out, full_check=True)
    assert data.src_vocab is data.tgt_vocab and data.split_names == ("train", "valid", "t1")
    first_seen = list(dict.fromkeys(corpus["train_pairs"]))  # file order, duplicates left out
    expected = {
        "train": [pair for pair in first_seen if pair in set(corpus["kept"])],
        "valid": corpus["valid_pairs"][:8] + [corpus["valid_pairs"][10]],
        "t1": corpus["test_pairs"],
    }
    for name, pairs in expected.items():
        split = data.split(name)
        assert len(split) == len(pairs)
        for side, texts, vocab in (("src", [s for s, _ in pairs], data.src_vocab),
                                   ("tgt", [t for _, t in pairs], data.tgt_vocab)):
            encoded = vocab.encode_batch(texts)
            lengths = split.src_lengths if side == "src" else split.tgt_lengths
            assert lengths.dtype == np.int32 and lengths.tolist() == [len(e) for e in encoded]
            get = split.src if side == "src" else split.tgt
            assert [get(i).tolist() for i in range(len(split))] == encoded
            assert get(0).dtype == np.uint16
        if name != "train":
            assert split.texts() == pairs
    with pytest.raises(DataError, match="split 'train' keeps no text"):
        data.split("train").texts()
    with pytest.raises(DataError, match="no split 'test'"):
        data.split("test")
    assert data.vocab_json() == {"src": json.loads(data.src_vocab.to_json())}


def test_prepare_is_deterministic_and_independent_of_workers(prepared, corpus, tmp_path):
    first, report = prepared
    again = prepare(train=corpus["train"], valid=corpus["valid"], tests={"t1": corpus["test"]}, out=tmp_path / "d",
                    src_lang="en", tgt_lang="cs", dedup=True, **{**SMALL, "workers": 2})
    assert again.fingerprint == report.fingerprint
    names = sorted(p.name for p in first.iterdir() if p.suffix in (".bin", ".txt") or p.name == "vocab.json")
    assert len(names) == 2 * 3 * 2 + 2 * 2 + 1
    for name in names:
        assert (first / name).read_bytes() == (tmp_path / "d" / name).read_bytes(), name


def test_tsv_input_gives_the_same_data_as_the_prefix_input(corpus, prepared, tmp_path):
    _, report = prepared
    train = write_tsv(tmp_path / "train.tsv.gz", corpus["train_pairs"])
    valid = write_tsv(tmp_path / "valid.tsv", corpus["valid_pairs"])
    again = prepare(train=train, valid=valid, tests={"t1": corpus["test"]}, out=tmp_path / "d",
                    src_lang="en", tgt_lang="cs", dedup=True, **SMALL)
    assert again.fingerprint == report.fingerprint


def test_second_run_is_up_to_date_and_changes_are_prepared_again(corpus, tmp_path):
    folder = tmp_path / "in"
    train = write_prefix(folder, "train", normal_pairs(20))
    args = dict(train=train, valid=corpus["valid"], out=tmp_path / "d", src_lang="en", tgt_lang="cs", **SMALL)
    first = prepare(**args)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir()}
    second = prepare(**args)
    assert second.up_to_date and not first.up_to_date and second.fingerprint == first.fingerprint
    assert "up to date" in second.summary()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir()} == stamps

    write_prefix(folder, "train", normal_pairs(20) + [("old cat", "old cat")])
    changed = prepare(**args)
    assert not changed.up_to_date and changed.splits["train"].kept == 21
    retuned = prepare(**{**args, "max_len": 5})
    assert not retuned.up_to_date and retuned.fingerprint != changed.fingerprint
    assert PreparedData.open(tmp_path / "d").manifest["settings"]["max_len"] == 5


def test_the_vocabulary_is_learned_from_a_seeded_sample(corpus, tmp_path):
    args = dict(train=corpus["train"], valid=corpus["valid"], src_lang="en", tgt_lang="cs", **SMALL)
    full = PreparedData.open(prepare(out=tmp_path / "full", **args).out).src_vocab
    sampled = [PreparedData.open(prepare(out=tmp_path / f"s{i}", vocab_sample=4, **args).out).src_vocab
               for i in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) < len(full)


def test_sentencepiece_vocabulary(corpus, tmp_path):
    pytest.importorskip("sentencepiece")
    from attnlab.data.vocab import SentencePieceVocab, vocab_from_json

    prepare(train=corpus["train"], valid=corpus["valid"], out=tmp_path / "d", src_lang="en", tgt_lang="cs",
            tokenizer="sentencepiece", shared_vocab=False, **{**SMALL, "vocab_size": 280})
    data = PreparedData.open(tmp_path / "d")
    assert isinstance(data.src_vocab, SentencePieceVocab) and data.tgt_vocab is not data.src_vocab
    assert vocab_from_json(data.src_vocab.to_json()) == data.src_vocab
    valid = data.split("valid")
    assert [valid.tgt(i).tolist() for i in range(len(valid))] == data.tgt_vocab.encode_batch(
        [t for _, t in valid.texts()])
    assert data.src_vocab.decode(data.src_vocab.encode("<eos> red cat")) == "<eos> red cat"


# -- a prepared folder that does not match its manifest ------------------------------------------------


@pytest.fixture
def copy_of(prepared, tmp_path):
    import shutil

    shutil.copytree(prepared[0], tmp_path / "d")
    return tmp_path / "d"


def test_truncated_array_is_named(copy_of):
    file = copy_of / "train.tgt.ids.bin"
    file.write_bytes(file.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train\.tgt\.ids\.bin: \d+ bytes, the manifest says \d+ \(truncated"):
        PreparedData.open(copy_of)


def test_edited_manifest_is_named(copy_of):
    manifest = json.loads((copy_of / MANIFEST).read_text())
    manifest["splits"]["valid"]["pairs"] += 1
    (copy_of / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: the manifest was edited"):
        PreparedData.open(copy_of)


def test_changed_bytes_are_found_by_the_full_check(copy_of):
    file = copy_of / "valid.src.ids.bin"
    data = bytearray(file.read_bytes())
    data[0] ^= 1
    file.write_bytes(bytes(data))
    PreparedData.open(copy_of)  # the cheap check sees the right sizes
    with pytest.raises(DataError, match=r"valid\.src\.ids\.bin: contents differ from the manifest's sha256"):
        PreparedData.open(copy_of, full_check=True)


def test_an_unfinished_preparation_is_not_opened_and_is_prepared_again(copy_of, corpus):
    (copy_of / MANIFEST).unlink()
    with pytest.raises(DataError, match=r"manifest\.json: no such file; .*\(an unfinished preparation"):
        PreparedData.open(copy_of)
    report = prepare(train=corpus["train"], valid=corpus["valid"], tests={"t1": corpus["test"]}, out=copy_of,
                     src_lang="en", tgt_lang="cs", dedup=True, **SMALL)
    assert not report.up_to_date and PreparedData.open(copy_of).split("train").src(0).size > 0


def test_a_preparation_killed_midway_leaves_no_manifest(corpus, tmp_path, monkeypatch):
    import attnlab.data.prepared as prepared_module

    args = dict(train=corpus["train"], valid=corpus["valid"], out=tmp_path / "d", src_lang="en", tgt_lang="cs",
                **SMALL)
    prepare(**args)
    encode, calls = prepared_module._encode_chunk, []

    def killed_after_one_chunk(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return encode(*a, **k)

    monkeypatch.setattr(prepared_module, "_encode_chunk", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(**{**args, "max_len": 19})  # changed settings: prepares again, killed after one chunk
    with pytest.raises(DataError, match="an unfinished preparation"):
        PreparedData.open(tmp_path / "d")
    monkeypatch.setattr(prepared_module, "_encode_chunk", encode)
    assert not prepare(**{**args, "max_len": 19}).up_to_date
    assert PreparedData.open(tmp_path / "d", full_check=True).manifest["settings"]["max_len"] == 19


def test_files_of_a_test_split_no_longer_asked_for_are_removed(corpus, tmp_path):
    args = dict(train=corpus["train"], valid=corpus["valid"], out=tmp_path / "d", src_lang="en", tgt_lang="cs",
                **SMALL)
    prepare(**args, tests={"t1": corpus["test"]})
    assert (tmp_path / "d" / "t1.src.ids.bin").exists()
    prepare(**args)
    assert not list((tmp_path / "d").glob("t1.*"))
    assert PreparedData.open(tmp_path / "d").split_names == ("train", "valid")


# -- errors ----------------------------------------------------------------------------------------


def test_empty_corpus_after_cleaning_is_an_error_naming_the_files(corpus, tmp_path):
    train = write_prefix(tmp_path, "empty", [("", "a"), ("b", ""), ("", "")])
    with pytest.raises(DataError, match=r"empty\.en and .*empty\.cs: no sentence pair left in split 'train' "
                                        r"after cleaning \(read 3; dropped: empty 3"):
        prepare(train=train, valid=corpus["valid"], out=tmp_path / "d", src_lang="en", tgt_lang="cs", **SMALL)
    assert not (tmp_path / "d" / MANIFEST).exists()


def test_refuses_a_folder_that_is_not_a_prepared_dataset(corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"--out .*mine: a folder that is not a prepared dataset"):
        prepare(train=corpus["train"], valid=corpus["valid"], out=tmp_path / "mine", src_lang="en",
                tgt_lang="cs", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("change, message", [
    ({"max_ratio": 0.5}, "--max-ratio must be >= 1"),
    ({"vocab_size": 100}, "--vocab-size must be an integer >= 261"),
    ({"tokenizer": "wordpiece"}, "--tokenizer 'wordpiece'"),
    ({"tgt_lang": "en"}, "--src-lang and --tgt-lang are both 'en'"),
    ({"tests": {"valid": "x"}}, "--test valid=: a test name"),
])
def test_bad_settings_name_their_flag(corpus, tmp_path, change, message):
    args = dict(train=corpus["train"], valid=corpus["valid"], out=tmp_path / "d", src_lang="en", tgt_lang="cs",
                **SMALL)
    with pytest.raises(ConfigError, match=message):
        prepare(**{**args, **change})


def test_command_line_prepares_and_reports(corpus, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prepare_cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["prepare", "--src-lang", "en", "--tgt-lang", "cs", "--train", corpus["train"], "--valid",
            corpus["valid"], "--test", f"t1={corpus['test']}", "--out", str(tmp_path / "d"), "--vocab-size",
            "300", "--max-len", "20", "--dedup", "--workers", "0", "--no-progress"]
    assert prepare_cli.run(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "train: read 40, kept 30 (empty 3, duplicate 3, too_long 2, ratio 2)" in printed
    assert prepare_cli.run(parser.parse_args(argv)) == 0
    assert "up to date" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--test 't1': expected NAME=PREFIX_OR_TSV"):
        prepare_cli.run(parser.parse_args(argv[:-1] + ["--no-progress", "--test", "t1"]))


def test_read_pairs_gives_the_mapped_sentences(prepared):
    split = PreparedData.open(prepared[0]).split("train")
    order = [len(split) - 1, 0, 2, 2]
    read = split.read_pairs(order)
    assert len(read) == 4
    for i, (src, tgt) in zip(order, read):
        assert src.tolist() == split.src(i).tolist() and tgt.tolist() == split.tgt(i).tolist()
    with pytest.raises(IndexError, match="out of range"):
        split.read_pairs([len(split)])


def test_read_pairs_names_a_file_cut_after_opening(copy_of):
    split = PreparedData.open(copy_of).split("train")
    last = len(split) - 1
    file = copy_of / "train.src.ids.bin"
    file.write_bytes(file.read_bytes()[: 2 * int(split.src_offsets[last])])  # the last sentence is gone
    with pytest.raises(DataError, match=rf"train\.src\.ids\.bin: ends before sentence {last}"):
        split.read_pairs([last])


def test_a_dropped_dataset_closes_its_files(prepared):
    import gc
    import os

    gc.disable()  # the files must close without the cycle collector's help
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            PreparedData.open(prepared[0]).split("train").read_pairs([0])
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()


def test_a_second_preparation_of_a_folder_waits_for_the_first(corpus, tmp_path):
    """Another process holds the folder's lock: prepare says it waits, then finds the work done."""
    import fcntl
    import os
    import threading

    args = dict(train=write_prefix(tmp_path / "in", "train", normal_pairs(20)), valid=corpus["valid"],
                out=tmp_path / "d", src_lang="en", tgt_lang="cs", **SMALL)
    first = prepare(**args)
    fd = os.open(tmp_path / "d" / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a second process preparing the folder would hold it
    threading.Timer(0.5, os.close, (fd,)).start()
    with pytest.warns(UserWarning, match=f"{tmp_path / 'd'} is being prepared by another process; waiting"):
        second = prepare(**args)
    assert second.up_to_date and second.fingerprint == first.fingerprint
