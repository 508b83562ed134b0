"""Streaming readers for a user's parallel data: a fairseq-style prefix or a tab-separated file.

A split is given as one string, ``resolve_source`` tells the two forms apart:

- a **prefix** ``PREFIX``: two line-aligned files ``PREFIX.SRC_LANG`` and ``PREFIX.TGT_LANG``, each
  plain or gzipped (``PREFIX.en.gz``); both forms present for one language is an error, since one
  of them would silently be ignored;
- a **TSV file** whose name ends in ``.tsv`` or ``.tsv.gz``: ``source<TAB>target`` on every line.

Lines are read as ``corpus.read_lines`` reads them, but one at a time so that memory does not grow
with the file: strict UTF-8 (an error names the file and the 1-based line), a leading byte-order
mark dropped, split on ``\\n`` only, each sentence stripped of surrounding whitespace. Every error
is a ``DataError`` whose one-line message names the file and, where it applies, the line.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

__all__ = ["CorpusError", "Source", "resolve_source", "iter_lines", "count_lines", "file_digest"]

_BLOCK = 1 << 20


class CorpusError(DataError):
    """A corpus file is missing, unreadable, not UTF-8, empty, or misaligned with its partner."""


@dataclass(frozen=True)
class Source:
    """One split's input: ``files`` is (source file, target file) for a prefix, (tsv file,) for TSV."""

    spec: str
    kind: str  # "prefix" or "tsv"
    files: tuple[Path, ...]

    def count_pairs(self) -> int:
        """Number of sentence pairs; for a prefix, checks that the two files have as many lines."""
        counts = [count_lines(f) for f in self.files]
        if self.kind == "prefix" and counts[0] != counts[1]:
            raise CorpusError(
                f"line counts differ: {self.files[0]} has {counts[0]} lines, "
                f"{self.files[1]} has {counts[1]}; the two files of a prefix must be line-aligned"
            )
        return counts[0]

    def pairs(self) -> Iterator[tuple[str, str]]:
        """The (source, target) pairs in file order, each side stripped."""
        if self.kind == "tsv":
            yield from _tsv_pairs(self.files[0])
            return
        src_path, tgt_path = self.files
        src_lines, tgt_lines = iter_lines(src_path), iter_lines(tgt_path)
        number = 0
        for number, src in enumerate(src_lines, start=1):
            tgt = next(tgt_lines, None)
            if tgt is None:
                raise CorpusError(f"{tgt_path} ends at line {number - 1}, before {src_path} does")
            yield src, tgt
        if next(tgt_lines, None) is not None:
            raise CorpusError(f"{src_path} ends at line {number}, before {tgt_path} does")


def resolve_source(spec: str | os.PathLike[str], src_lang: str, tgt_lang: str, *, flag: str = "") -> Source:
    """The input files that ``spec`` (a prefix or a .tsv/.tsv.gz file) names; DataError if missing.

    ``flag`` (e.g. ``--train``) is named in the error so the user knows which argument was wrong.
    """
    text = os.fspath(spec)
    where = f"{flag} " if flag else ""
    if text.endswith((".tsv", ".tsv.gz")):
        path = Path(text)
        if not path.is_file():
            raise CorpusError(f"{where}{path}: no such file")
        return Source(text, "tsv", (path,))
    files = []
    for lang in (src_lang, tgt_lang):
        plain, packed = Path(f"{text}.{lang}"), Path(f"{text}.{lang}.gz")
        found = [p for p in (plain, packed) if p.is_file()]
        if not found:
            raise CorpusError(
                f"{where}{plain} (or {packed.name}): no such file; a split is a prefix PREFIX with "
                f"files PREFIX.{src_lang} and PREFIX.{tgt_lang} (plain or .gz), or a .tsv/.tsv.gz file"
            )
        if len(found) == 2:
            raise CorpusError(f"{where}both {plain} and {packed} exist; keep one of them")
        files.append(found[0])
    return Source(text, "prefix", tuple(files))


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each line; read errors (broken gzip) name the file."""
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    try:
        with _open_binary(path) as f:
            yield from enumerate(f, start=1)
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{path}: cannot read file ({e})") from e


def _decode(path: Path, number: int, raw: bytes) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}, line {number}: invalid UTF-8 "
            f"(byte 0x{raw[e.start]:02x} at column {e.start + 1}: {e.reason})"
        ) from None
    return line.removeprefix("\ufeff") if number == 1 else line


def iter_lines(path: str | os.PathLike[str]) -> Iterator[str]:
    """The stripped lines of a text file (gzipped if named ``*.gz``), one at a time."""
    path = Path(path)
    for number, raw in _raw_lines(path):
        yield _decode(path, number, raw).strip()


def _tsv_pairs(path: Path) -> Iterator[tuple[str, str]]:
    for number, raw in _raw_lines(path):
        line = _decode(path, number, raw).rstrip("\r\n")
        tabs = line.count("\t")
        if tabs != 1:
            raise CorpusError(
                f"{path}, line {number}: expected source<TAB>target (one tab), found {tabs} tabs"
            )
        src, tgt = line.split("\t")
        yield src.strip(), tgt.strip()


def count_lines(path: str | os.PathLike[str]) -> int:
    """Number of lines, as ``iter_lines`` yields them (a last line without ``\\n`` counts)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    count, last = 0, b"\n"
    try:
        with _open_binary(path) as f:
            while block := f.read(_BLOCK):
                count += block.count(b"\n")
                last = block[-1:]
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{path}: cannot read file ({e})") from e
    return count + (last != b"\n")


def file_digest(path: str | os.PathLike[str]) -> dict[str, object]:
    """Size and sha256 of a file's bytes as stored (the compressed bytes of a .gz)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    except OSError as e:
        raise CorpusError(f"{path}: cannot read file ({e})") from e
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}
