"""Reading parallel corpora: plain and gzipped files, clear errors, and the real Multi30k."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from attnlab.data.corpus import (
    DATA_DIR,
    CorpusError,
    default_data_dir,
    load_multi30k,
    multi30k_files,
    read_lines,
    read_parallel,
)

SAMPLE = "Zwei Männer \n  Ein Café.\r\nline with\u2028separator\nlast line without newline"
SAMPLE_LINES = ["Zwei Männer", "Ein Café.", "line with\u2028separator", "last line without newline"]


def write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["sample.txt", "sample.gz"])
def test_read_lines_strips_each_line_and_splits_on_newline_only(tmp_path, name):
    path = write(tmp_path / name, SAMPLE.encode("utf-8"))
    assert read_lines(path) == SAMPLE_LINES


def test_read_lines_keeps_empty_lines_and_drops_a_byte_order_mark(tmp_path):
    path = write(tmp_path / "bom.txt", "\ufeffeins\n\ndrei\n".encode("utf-8"))
    assert read_lines(path) == ["eins", "", "drei"]


@pytest.mark.parametrize("name", ["bad.txt", "bad.gz"])
def test_invalid_utf8_names_file_and_line(tmp_path, name):
    path = write(tmp_path / name, b"ok\nfine\nbad \xff here\nok again\n")
    with pytest.raises(CorpusError, match=r"line 3: invalid UTF-8") as info:
        read_lines(path)
    assert name in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CorpusError, match="nowhere.de.gz: no such file"):
        read_lines(tmp_path / "nowhere.de.gz")


def test_broken_gzip_is_a_corpus_error(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(b"a\nb\n")[:-8])  # cut off the trailer
    with pytest.raises(CorpusError, match="broken.gz: cannot read file"):
        read_lines(path)


def test_corpus_error_is_a_value_error():
    assert issubclass(CorpusError, ValueError)


def test_read_parallel_pairs_aligned_lines(tmp_path):
    src = write(tmp_path / "a.de", "Hallo Welt\nGuten Tag\n".encode())
    tgt = write(tmp_path / "a.en.gz", b"Hello world\nGood day\n")
    assert read_parallel(src, tgt) == [("Hallo Welt", "Hello world"), ("Guten Tag", "Good day")]


def test_read_parallel_differing_counts_names_files_and_counts(tmp_path):
    src = write(tmp_path / "three.de", b"a\nb\nc\n")
    tgt = write(tmp_path / "two.en", b"a\nb\n")
    with pytest.raises(CorpusError) as info:
        read_parallel(src, tgt)
    message = str(info.value)
    assert "three.de has 3 lines" in message
    assert "two.en has 2" in message


@pytest.mark.parametrize("empty_side", ["src", "tgt"])
def test_read_parallel_empty_file_names_it(tmp_path, empty_side):
    files = {
        "src": write(tmp_path / "src.txt", b"" if empty_side == "src" else b"x\n"),
        "tgt": write(tmp_path / "tgt.txt", b"" if empty_side == "tgt" else b"x\n"),
    }
    with pytest.raises(CorpusError, match=rf"{empty_side}\.txt: file is empty"):
        read_parallel(files["src"], files["tgt"])


def test_multi30k_files_paths(tmp_path):
    src, tgt = multi30k_files("val", "en", "fr", data_dir=tmp_path)
    assert (src, tgt) == (tmp_path / "multi30k/val.en.gz", tmp_path / "multi30k/val.fr.gz")


def test_multi30k_files_rejects_unknown_split_and_language():
    with pytest.raises(CorpusError, match="'dev'.*train, val, test_2016_flickr"):
        multi30k_files("dev", "de", "en")
    with pytest.raises(CorpusError, match="target language 'cs'.*de, en, fr"):
        multi30k_files("train", "de", "cs")
    with pytest.raises(CorpusError, match="both 'de'"):
        multi30k_files("train", "de", "de")


def test_data_folder_follows_attnlab_data(tmp_path, monkeypatch):
    folder = tmp_path / "multi30k"
    folder.mkdir()
    write(folder / "val.de.gz", "Ein Hund läuft.\n".encode())
    write(folder / "val.en.gz", b"A dog runs.\n")
    monkeypatch.setenv("ATTNLAB_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert load_multi30k("val", "de", "en") == [("Ein Hund läuft.", "A dog runs.")]
    monkeypatch.delenv("ATTNLAB_DATA")
    assert default_data_dir() == Path(__file__).resolve().parents[1] / "src" / "attnlab" / "data" / "bundled"


def test_load_multi30k_missing_files_point_at_attnlab_data(tmp_path):
    with pytest.raises(CorpusError, match="not found.*ATTNLAB_DATA"):
        load_multi30k("train", "de", "en", data_dir=tmp_path)


def test_real_multi30k_splits_are_aligned():
    train = load_multi30k("train", "de", "en", data_dir=DATA_DIR)
    assert len(train) == 29000
    assert train[0] == (
        "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
        "Two young, White males are outside near many bushes.",
    )
    assert all(de and en for de, en in train)
    assert len(load_multi30k("val", "en", "fr", data_dir=DATA_DIR)) == 1014
    assert len(load_multi30k("test_2016_flickr", "de", "en", data_dir=DATA_DIR)) == 1000
