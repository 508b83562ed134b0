"""Reading parallel corpora: aligned text files, one sentence per line, plain or gzipped.

Every line is decoded as strict UTF-8 and stripped of surrounding whitespace (the newline and
any stray spaces, which Multi30k has a few of and which carry no meaning). Lines are split on
``\\n`` only, never on the other Unicode line separators, so that a U+2028 inside a sentence
cannot shift the alignment of two files.

The Multi30k files live in ``<data>/multi30k/{split}.{lang}.gz``. The data folder is the corpora
shipped inside the package (``attnlab/data/bundled``, package data, so an installed wheel has them
too; the checkout's ``data/`` points there) unless the environment variable ``ATTNLAB_DATA`` names
another one.
"""

from __future__ import annotations

import os
from pathlib import Path

from .sources import CorpusError, iter_lines

__all__ = [
    "BUNDLED_DATA_DIR",
    "CorpusError",
    "DATA_DIR",
    "MULTI30K_LANGS",
    "MULTI30K_SPLITS",
    "default_data_dir",
    "load_multi30k",
    "multi30k_files",
    "read_lines",
    "read_parallel",
]

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "bundled"

DATA_DIR: Path = Path(os.environ.get("ATTNLAB_DATA") or BUNDLED_DATA_DIR)
"""The data folder as seen at import time: ``$ATTNLAB_DATA`` if set, else the bundled corpora."""

MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
MULTI30K_LANGS = ("de", "en", "fr")


def default_data_dir() -> Path:
    """Data folder: ``$ATTNLAB_DATA`` if set (read at each call), else the bundled corpora."""
    return Path(os.environ.get("ATTNLAB_DATA") or BUNDLED_DATA_DIR)


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """Read a text file (gzipped if its name ends in ``.gz``) into stripped lines.

    Raises CorpusError for a missing file, a broken gzip stream, or invalid UTF-8; the message
    names the file and, for bad UTF-8, the 1-based line number. A leading byte-order mark is
    dropped. Empty lines are kept, since they still hold a place in an aligned corpus. (The lines
    are those of ``sources.iter_lines``, which streams them one at a time.)
    """
    return list(iter_lines(path))


def read_parallel(
    src_path: str | os.PathLike[str], tgt_path: str | os.PathLike[str]
) -> list[tuple[str, str]]:
    """Read two line-aligned files into (source, target) sentence pairs.

    Raises CorpusError if either file is empty or the two differ in line count, since a
    misaligned corpus silently trains a model on wrong translations.
    """
    src_lines = read_lines(src_path)
    tgt_lines = read_lines(tgt_path)
    for path, lines in ((src_path, src_lines), (tgt_path, tgt_lines)):
        if not lines:
            raise CorpusError(f"{path}: file is empty")
    if len(src_lines) != len(tgt_lines):
        raise CorpusError(
            f"line counts differ: {src_path} has {len(src_lines)} lines, "
            f"{tgt_path} has {len(tgt_lines)}"
        )
    return list(zip(src_lines, tgt_lines))


def multi30k_files(
    split: str,
    src_lang: str,
    tgt_lang: str,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Paths of the Multi30k source and target files of one split (not checked for existence).

    ``data_dir`` defaults to ``default_data_dir()``; the files are ``multi30k/{split}.{lang}.gz``.
    """
    if split not in MULTI30K_SPLITS:
        raise CorpusError(
            f"unknown Multi30k split {split!r}; valid splits: {', '.join(MULTI30K_SPLITS)}"
        )
    for role, lang in (("source", src_lang), ("target", tgt_lang)):
        if lang not in MULTI30K_LANGS:
            raise CorpusError(
                f"unknown Multi30k {role} language {lang!r}; "
                f"valid languages: {', '.join(MULTI30K_LANGS)}"
            )
    if src_lang == tgt_lang:
        raise CorpusError(f"source and target language are both {src_lang!r}")
    folder = (Path(data_dir) if data_dir is not None else default_data_dir()) / "multi30k"
    return folder / f"{split}.{src_lang}.gz", folder / f"{split}.{tgt_lang}.gz"


def load_multi30k(
    split: str,
    src_lang: str,
    tgt_lang: str,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[tuple[str, str]]:
    """The (source, target) sentence pairs of one Multi30k split, e.g. ``("train", "de", "en")``."""
    src_path, tgt_path = multi30k_files(split, src_lang, tgt_lang, data_dir)
    for path in (src_path, tgt_path):
        if not path.is_file():
            raise CorpusError(
                f"{path}: Multi30k file not found; copy the corpus into {path.parent} "
                "or point the ATTNLAB_DATA environment variable at a folder holding multi30k/"
            )
    return read_parallel(src_path, tgt_path)
