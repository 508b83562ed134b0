"""Prepared datasets: a parallel corpus cleaned, encoded once, and read back through a memory map.

``prepare`` turns a user's parallel data (see ``sources``: a prefix with two aligned files, or a
TSV file, per split) into a folder DATA_DIR that training reads without loading the corpus:

1. **Count and hash** each input (sha256 and size go into the manifest; a prefix whose two files
   differ in line count is refused here, before any work).
2. **Learn the vocabulary** (``Vocab.train``, Hugging Face BPE; or ``SentencePieceVocab``,
   unigram) from a bounded random sample of ``vocab_sample`` training pairs, streamed from the
   file: the sample's indices are drawn with ``seed``, so the vocabulary is reproducible and the
   sample is never held in memory. Pairs with an empty side are left out of the sample.
3. **Clean, encode and write**, chunk by chunk (memory does not grow with the corpus): each rule
   counts what it drops, per split, and the report says so. Training pairs are dropped for an
   empty side, an exact duplicate of an earlier pair (``dedup``, off by default), more than
   ``max_len`` subwords on a side, or a length ratio above ``max_ratio`` (longer side / shorter
   side, in subwords). The defaults, 250 and 1.5, are those of fairseq's WMT recipes
   (``clean-corpus-n.perl -ratio 1.5 ... 1 250``, applied to BPE tokens). The validation split
   loses only empty and over-long pairs (as in those recipes); test splits are kept whole, so that
   BLEU is computed on the full test set. ``dedup`` is the one thing whose memory grows with the
   corpus: it keeps a 64-bit hash of every distinct pair in a set (on 2M pairs the peak resident
   memory of ``prepare`` was 280 MB with it, 122 MB without).
4. **Write the manifest last**, atomically: a folder without ``manifest.json`` is an unfinished
   preparation, never mistaken for a complete one (a re-run prepares it again).

Array format. Per split and side, two raw little-endian files (fairseq's ``MMapIndexedDataset``
idea): ``{split}.{side}.ids.bin``, every sentence's token ids one after another (no ``<bos>`` /
``<eos>``; ``uint16`` when the vocabulary has at most 65,536 ids, which halves the size, else
``int32``), and ``{split}.{side}.offsets.bin``, ``int64``, one more entry than sentences, so that
sentence ``i`` is ``ids[offsets[i]:offsets[i + 1]]``. Raw files rather than ``.npy``: they are
appended chunk by chunk while encoding, when the final length is not yet known (an ``.npy``
header needs it up front); the dtype and length live in the manifest, and ``np.memmap`` reads
them with no copy. The validation and test splits also keep their cleaned text
(``{split}.src.txt`` / ``{split}.tgt.txt``, one sentence a line) as BLEU references.

The manifest records the format version, the languages, the settings, each input file's size and
sha256, the vocabulary file's sha256, every array file's dtype, length, size and sha256, and the
cleaning report. ``PreparedData.open`` checks it against the files (sizes always, hashes on
request), and its ``fingerprint`` (a sha256 over the settings, the vocabulary and the arrays'
hashes) identifies the prepared data in checkpoints. Re-running ``prepare`` with the same inputs
and settings finds the manifest matching and does nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from itertools import chain
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..store.files import write_text_atomic
from .sources import Source, file_digest, resolve_source
from .vocab import (
    BaseVocab,
    SentencePieceVocab,
    Vocab,
    vocabs_from_dict,
    vocabs_to_dict,
)

__all__ = [
    "FORMAT_VERSION",
    "TOKENIZERS",
    "PrepareReport",
    "SplitReport",
    "PreparedData",
    "PreparedSplit",
    "prepare",
]

FORMAT_VERSION = 1
TOKENIZERS = ("bpe", "sentencepiece")
MANIFEST, REPORT, VOCAB, MARKER = "manifest.json", "report.json", "vocab.json", ".attnlab-prepared"
LOCK = ".lock"
SIDES = ("src", "tgt")
CHUNK_PAIRS = 8192  # pairs encoded at a time: big enough for the tokenizer's threads, small in memory
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RULES = {  # the cleaning rules each kind of split applies, in the order they are checked
    "train": ("empty", "duplicate", "too_long", "ratio"),  # "duplicate" only with dedup=True
    "valid": ("empty", "too_long"),
    "test": (),
}


# -- the report -------------------------------------------------------------------------------------


@dataclass
class SplitReport:
    """What cleaning did to one split: pairs read, kept, and dropped by each rule."""

    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    src_tokens: int = 0
    tgt_tokens: int = 0


@dataclass
class PrepareReport:
    """The outcome of ``prepare``; ``up_to_date`` when the folder already held this preparation."""

    up_to_date: bool
    out: Path
    splits: dict[str, SplitReport]
    src_vocab_size: int
    tgt_vocab_size: int
    shared_vocab: bool
    tokenizer: str
    fingerprint: str
    seconds: float
    pairs_per_s: float
    bytes_on_disk: int
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepareReport:
        data = dict(data)
        data["out"] = Path(data["out"])
        data["splits"] = {k: SplitReport(**v) for k, v in data["splits"].items()}
        return cls(**data)

    def summary(self) -> str:
        """A few lines for the terminal: the folder, each split's counts, the speed."""
        head = (f"{self.out}: up to date" if self.up_to_date else
                f"prepared {self.out} in {self.seconds:.1f} s ({self.pairs_per_s:,.0f} pairs/s)")
        vocab = (f"vocabulary: {self.tokenizer}, {self.src_vocab_size} ids"
                 + (" shared" if self.shared_vocab else f" / {self.tgt_vocab_size} ids"))
        lines = [head, vocab]
        for name, s in self.splits.items():
            dropped = ", ".join(f"{rule} {n}" for rule, n in s.dropped.items()) or "no cleaning"
            lines.append(f"  {name}: read {s.read}, kept {s.kept} ({dropped}); "
                         f"{s.src_tokens} + {s.tgt_tokens} tokens")
        lines.append(f"size on disk: {self.bytes_on_disk / 1e6:.1f} MB; fingerprint {self.fingerprint[:16]}")
        return "\n".join(lines)


# -- reading a prepared folder ----------------------------------------------------------------------


class PreparedSplit:
    """One split's token arrays, memory-mapped: ``src(i)`` / ``tgt(i)`` are views, no copy."""

    def __init__(self, data: PreparedData, name: str) -> None:
        self.name = name
        self._path = data.path  # not the PreparedData itself: no reference cycle, so files close promptly
        entry = data.manifest["splits"][name]
        self._pairs = int(entry["pairs"])
        self._entry = entry
        self._fds: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return self._pairs

    def _array(self, side: str, part: str) -> np.ndarray:
        info = self._entry[side][part]
        if info["count"] == 0:
            return np.zeros(0, dtype=info["dtype"])
        return np.memmap(self._path / info["file"], dtype=info["dtype"], mode="r", shape=(info["count"],))

    @cached_property
    def src_ids(self) -> np.ndarray:
        """Every source token id of the split, one sentence after another (memory-mapped)."""
        return self._array("src", "ids")

    @cached_property
    def tgt_ids(self) -> np.ndarray:
        return self._array("tgt", "ids")

    @cached_property
    def src_offsets(self) -> np.ndarray:
        """int64, ``len + 1`` entries: sentence ``i`` is ``src_ids[src_offsets[i]:src_offsets[i + 1]]``."""
        return self._array("src", "offsets")

    @cached_property
    def tgt_offsets(self) -> np.ndarray:
        return self._array("tgt", "offsets")

    @cached_property
    def src_lengths(self) -> np.ndarray:
        """int32 number of source tokens of each sentence (no ``<bos>``/``<eos>``).

        Computed from offsets read into memory once (``_lengths``), not through the map: every page
        of a mapped file that is read stays in the process's resident memory."""
        return self._lengths("src")

    @cached_property
    def tgt_lengths(self) -> np.ndarray:
        return self._lengths("tgt")

    def _lengths(self, side: str) -> np.ndarray:
        info = self._entry[side]["offsets"]
        if info["count"] == 0:
            return np.zeros(0, dtype=np.int32)
        offsets = np.fromfile(self._path / info["file"], dtype=info["dtype"], count=info["count"])
        return np.diff(offsets).astype(np.int32)

    def _check_index(self, i: int) -> int:
        if not -self._pairs <= i < self._pairs:
            raise IndexError(f"pair {i} out of range for split {self.name!r} of {self._pairs} pairs")
        return i % self._pairs

    def src(self, i: int) -> np.ndarray:
        """Token ids of source sentence ``i`` (a view into the memory map)."""
        i = self._check_index(i)
        return self.src_ids[self.src_offsets[i]:self.src_offsets[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        return self.tgt_ids[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]

    def read_pairs(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The token ids of the pairs at ``indices`` (source, target), copied out of the files.

        What training reads, one batch at a time. The ids and their offsets are read with
        ``os.pread`` rather than through the memory map: with the large page-cache folios of current
        Linux file systems (ext4 since 6.16), a fault in a mapped file maps a whole folio into the
        process, and 300 random batches mapped 84 MB of an 80 MB file into the trainer's resident
        memory; read calls cost the same (0.8 ms per 270-pair batch) and leave the pages in the
        page cache, outside the process. (The lengths, too, are computed from offsets read in.)
        """
        pairs = []
        for i in indices:
            i = self._check_index(int(i))
            src, tgt = (self._read_sentence(side, i) for side in SIDES)
            pairs.append((src, tgt))
        return pairs

    def _read_sentence(self, side: str, i: int) -> np.ndarray:
        ids_fd, offsets_fd = self._files(side)
        bounds = os.pread(offsets_fd, 16, 8 * i)
        start, end = np.frombuffer(bounds, dtype="<i8").tolist() if len(bounds) == 16 else (0, -1)
        if end < start:
            raise DataError(f"{self._path / self._entry[side]['offsets']['file']}: no offsets of sentence {i} "
                            "(the file was cut short or changed after it was prepared)")
        dtype = np.dtype(self._entry[side]["ids"]["dtype"]).newbyteorder("<")
        data = os.pread(ids_fd, (end - start) * dtype.itemsize, start * dtype.itemsize)
        if len(data) != (end - start) * dtype.itemsize:
            raise DataError(f"{self._path / self._entry[side]['ids']['file']}: ends before sentence {i} "
                            "(the file was cut short after it was prepared)")
        return np.frombuffer(data, dtype=dtype)

    def _files(self, side: str) -> tuple[int, int]:
        """Read-only descriptors of a side's ids and offsets files, opened on first use."""
        if side not in self._fds:
            self._fds[side] = tuple(os.open(self._path / self._entry[side][part]["file"], os.O_RDONLY)
                                    for part in ("ids", "offsets"))
        return self._fds[side]

    def __del__(self) -> None:
        for fds in getattr(self, "_fds", {}).values():
            for fd in fds:
                os.close(fd)

    def texts(self) -> list[tuple[str, str]]:
        """The cleaned (source, target) sentence pairs: kept for validation and test splits only."""
        texts = self._entry.get("texts")
        if not texts:
            raise DataError(
                f"{self._path}: split {self.name!r} keeps no text (only validation and test "
                "splits keep theirs, as BLEU references)"
            )
        sides = [_read_text_lines(self._path / texts[side]["file"]) for side in SIDES]
        if not len(sides[0]) == len(sides[1]) == self._pairs:
            raise DataError(f"{self._path / texts['src']['file']}: does not hold {self._pairs} lines")
        return list(zip(*sides))

    def __repr__(self) -> str:
        return f"PreparedSplit({self.name!r}, pairs={self._pairs})"


class PreparedData:
    """A folder written by ``prepare``: the manifest, the vocabularies, and each split's arrays."""

    def __init__(self, path: Path, manifest: dict[str, Any], src_vocab: BaseVocab, tgt_vocab: BaseVocab):
        self.path = path
        self.manifest = manifest
        self.src_lang: str = manifest["src_lang"]
        self.tgt_lang: str = manifest["tgt_lang"]
        self.fingerprint: str = manifest["fingerprint"]
        self.src_vocab = src_vocab
        self.tgt_vocab = tgt_vocab
        self.split_names: tuple[str, ...] = tuple(manifest["splits"])
        self._splits: dict[str, PreparedSplit] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, full_check: bool = False) -> PreparedData:
        """Open a prepared folder, checking its files against the manifest.

        Always checked (cheap): the manifest's own fingerprint, each file's presence and size,
        the vocabulary's sha256, and each offsets array's first and last entry. ``full_check``
        also hashes every array and text file. Any mismatch is a ``DataError`` naming the file.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        _check_files(path, manifest, full=full_check)
        src_vocab, tgt_vocab = vocabs_from_dict(json.loads((path / VOCAB).read_text(encoding="utf-8")))
        return cls(path, manifest, src_vocab, tgt_vocab)

    def vocab_json(self) -> dict[str, Any]:
        """The vocabularies in ``vocabs_to_dict`` form, as checkpoints store them."""
        return vocabs_to_dict(self.src_vocab, self.tgt_vocab)

    def split(self, name: str) -> PreparedSplit:
        if name not in self.split_names:
            raise DataError(f"{self.path}: no split {name!r}; its splits: {', '.join(self.split_names)}")
        if name not in self._splits:
            self._splits[name] = PreparedSplit(self, name)
        return self._splits[name]

    @property
    def test_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.split_names if n not in ("train", "valid"))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}={self.manifest['splits'][n]['pairs']}" for n in self.split_names)
        return f"PreparedData({str(self.path)!r}, {self.src_lang}-{self.tgt_lang}, {sizes})"


def _read_text_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read prepared text ({e})") from None
    lines = data.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        hint = (" (an unfinished preparation: run attnlab prepare again)" if (path / MARKER).exists()
                else "; prepare one with attnlab prepare --out")
        raise DataError(f"{file}: no such file; {path} is not a prepared dataset{hint}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: cannot read the manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "attnlab-prepared":
        raise DataError(f"{file}: not an attnlab prepared-data manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{file}: format version {manifest.get('version')!r}, this attnlab reads "
                        f"version {FORMAT_VERSION}; prepare the data again")
    try:
        fingerprint = _fingerprint(manifest)
    except (KeyError, TypeError) as e:
        raise DataError(f"{file}: the manifest lacks a field ({e})") from None
    if manifest.get("fingerprint") != fingerprint:
        raise DataError(f"{file}: the manifest was edited (its fingerprint does not match its contents); "
                        "prepare the data again")
    return manifest


def _manifest_files(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every file entry of the manifest (vocabulary, arrays, texts), each with file/size/sha256."""
    yield manifest["vocab"]
    for entry in manifest["splits"].values():
        for side in SIDES:
            yield entry[side]["ids"]
            yield entry[side]["offsets"]
        for side in SIDES:
            if entry.get("texts"):
                yield entry["texts"][side]


def _check_files(path: Path, manifest: dict[str, Any], *, full: bool) -> None:
    for info in _manifest_files(manifest):
        file = path / info["file"]
        if not file.is_file():
            raise DataError(f"{file}: missing from the prepared dataset; prepare the data again")
        size = file.stat().st_size
        if size != info["size"]:
            raise DataError(f"{file}: {size} bytes, the manifest says {info['size']} "
                            "(truncated or replaced); prepare the data again")
        if (full or info is manifest["vocab"]) and file_digest(file)["sha256"] != info["sha256"]:
            raise DataError(f"{file}: contents differ from the manifest's sha256 (edited or corrupted); "
                            "prepare the data again")
    for name, entry in manifest["splits"].items():
        for side in SIDES:
            ids, offsets = entry[side]["ids"], entry[side]["offsets"]
            file = path / offsets["file"]
            if offsets["count"] != entry["pairs"] + 1 or ids["size"] != ids["count"] * np.dtype(ids["dtype"]).itemsize:
                raise DataError(f"{file}: the manifest's counts for split {name!r} do not fit together")
            mapped = np.memmap(file, dtype=offsets["dtype"], mode="r", shape=(offsets["count"],))
            if mapped[0] != 0 or mapped[-1] != ids["count"]:
                raise DataError(f"{file}: offsets run from {mapped[0]} to {mapped[-1]}, "
                                f"but {ids['file']} holds {ids['count']} ids; prepare the data again")


def _fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 over what defines the prepared data: settings, vocabulary and every file's hash."""
    core = {
        "version": manifest["version"],
        "languages": [manifest["src_lang"], manifest["tgt_lang"]],
        "settings": manifest["settings"],
        "files": sorted((f["file"], f["sha256"], f["size"], f.get("dtype"), f.get("count"))
                        for f in _manifest_files(manifest)),
        "pairs": {name: entry["pairs"] for name, entry in manifest["splits"].items()},
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode("utf-8")).hexdigest()


# -- preparing --------------------------------------------------------------------------------------


def prepare(
    *,
    train: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    out: str | os.PathLike[str],
    src_lang: str,
    tgt_lang: str,
    tests: dict[str, str | os.PathLike[str]] | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 8000,
    shared_vocab: bool = True,
    vocab_sample: int = 1_000_000,
    max_len: int = 250,
    max_ratio: float = 1.5,
    dedup: bool = False,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> PrepareReport:
    """Clean, learn a vocabulary, encode and write a parallel corpus into ``out`` (see the module).

    ``train``, ``valid`` and each value of ``tests`` (named by its key) is a prefix or a TSV file.
    ``workers``: 1 (the default; 0 too) encodes in this process, on the tokenizer's own threads
    (Rayon, every core); N >= 2 starts N single-threaded encoding processes while this one reads
    and writes. On the project's 2-core machine the pool was no faster (encoding 100,000 pairs:
    12.2 s with 2 workers, 12.4 s in-process; in an earlier run 20.9 s against 17.7 s), since the
    tokenizer's threads already keep the cores busy and reading, cleaning and writing take little
    (the encode stage ran at 1.03x the tokenizer-alone rate). The result does not depend on it.
    Returns the report; when ``out`` already holds this preparation (same inputs by sha256, same
    settings), returns its stored report with ``up_to_date=True`` and writes nothing.
    """
    started = time.perf_counter()
    tests = dict(tests or {})
    settings = _check_settings(src_lang, tgt_lang, tests, tokenizer, vocab_size, vocab_sample, max_len,
                               max_ratio, workers, shared_vocab, dedup, seed)
    out = Path(out)
    sources = {"train": resolve_source(train, src_lang, tgt_lang, flag="--train"),
               "valid": resolve_source(valid, src_lang, tgt_lang, flag="--valid")}
    for name, spec in tests.items():
        sources[name] = resolve_source(spec, src_lang, tgt_lang, flag=f"--test {name}=")
    inputs = {name: {"kind": s.kind, "files": [{"path": str(f), **file_digest(f)} for f in s.files]}
              for name, s in sources.items()}
    request = {"src_lang": src_lang, "tgt_lang": tgt_lang, "settings": settings,
               "inputs": {n: [(f["size"], f["sha256"]) for f in v["files"]] for n, v in inputs.items()}}
    stages = {"hash": time.perf_counter() - started}

    _claim_folder(out)
    with _folder_lock(out):  # one preparation of a folder at a time; others wait, then find it ready
        previous_files = _files_of_manifest(out)
        tick = time.perf_counter()
        counts = {name: s.count_pairs() for name, s in sources.items()}  # refuses misaligned files, folder untouched
        stages["count"] = time.perf_counter() - tick
        current = _current_report(out, request)
        if current is not None:
            return current

        tick = time.perf_counter()
        src_vocab, tgt_vocab = _learn_vocab(sources["train"], counts["train"], settings, progress)
        vocab_text = json.dumps(vocabs_to_dict(src_vocab, tgt_vocab), ensure_ascii=False)
        write_text_atomic(out / VOCAB, vocab_text)
        stages["vocab"] = time.perf_counter() - tick

        tick = time.perf_counter()
        dtypes = {"src": _ids_dtype(src_vocab), "tgt": _ids_dtype(tgt_vocab)}
        splits, reports = {}, {}
        with _Encoder(src_vocab, tgt_vocab, dtypes, workers) as encoder:
            for name, source in sources.items():
                kind = name if name in ("train", "valid") else "test"
                rules = tuple(r for r in _RULES[kind] if r != "duplicate" or dedup)
                splits[name], reports[name] = _write_split(
                    out, name, source, counts[name], rules, settings, encoder, progress)
        stages["encode"] = time.perf_counter() - tick

        manifest = {
            "format": "attnlab-prepared", "version": FORMAT_VERSION,
            "src_lang": src_lang, "tgt_lang": tgt_lang, "settings": settings, "request": request,
            "inputs": inputs,
            "vocab": {"file": VOCAB, "kind": src_vocab.kind, "shared": tgt_vocab is src_vocab,
                      "src_size": len(src_vocab), "tgt_size": len(tgt_vocab),
                      "size": len(vocab_text.encode("utf-8")),
                      "sha256": hashlib.sha256(vocab_text.encode("utf-8")).hexdigest()},
            "splits": splits,
            "cleaning": {name: asdict(r) for name, r in reports.items()},
        }
        manifest["fingerprint"] = _fingerprint(manifest)
        seconds = time.perf_counter() - started
        read = sum(r.read for r in reports.values())
        report = PrepareReport(
            up_to_date=False, out=out, splits=reports, src_vocab_size=len(src_vocab),
            tgt_vocab_size=len(tgt_vocab), shared_vocab=tgt_vocab is src_vocab, tokenizer=tokenizer,
            fingerprint=manifest["fingerprint"], seconds=seconds, pairs_per_s=read / max(seconds, 1e-9),
            bytes_on_disk=sum(info["size"] for info in _manifest_files(manifest)), stage_seconds=stages,
        )
        write_text_atomic(out / REPORT, json.dumps(report.to_dict(), indent=1))
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
        for name in previous_files - {info["file"] for info in _manifest_files(manifest)}:
            (out / name).unlink(missing_ok=True)  # e.g. the arrays of a test split no longer asked for
        return report


def _check_settings(src_lang, tgt_lang, tests, tokenizer, vocab_size, vocab_sample, max_len, max_ratio,
                    workers, shared_vocab, dedup, seed) -> dict[str, Any]:
    for flag, lang in (("--src-lang", src_lang), ("--tgt-lang", tgt_lang)):
        if not lang or not _NAME.fullmatch(lang):
            raise ConfigError(f"{flag} {lang!r}: a language code is letters, digits, '_', '-' or '.'")
    if src_lang == tgt_lang:
        raise ConfigError(f"--src-lang and --tgt-lang are both {src_lang!r}")
    for name in tests:
        if not _NAME.fullmatch(name) or name in ("train", "valid"):
            raise ConfigError(f"--test {name}=: a test name is letters, digits, '_', '-' or '.', "
                              "and not 'train' or 'valid'")
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"--tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
    if tokenizer == "sentencepiece":
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise ConfigError("--tokenizer sentencepiece needs the sentencepiece package "
                              "(pip install sentencepiece)") from None
    for flag, value, least in (("--vocab-size", vocab_size, 261), ("--vocab-sample", vocab_sample, 1),
                               ("--max-len", max_len, 1)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{flag} must be an integer >= {least}, got {value!r}")
    if not max_ratio >= 1.0:
        raise ConfigError(f"--max-ratio must be >= 1 (longer side / shorter side), got {max_ratio!r}")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"--seed must be an integer in [0, 2**63), got {seed!r}")
    return {"tokenizer": tokenizer, "vocab_size": vocab_size, "shared_vocab": bool(shared_vocab),
            "vocab_sample": vocab_sample, "max_len": max_len, "max_ratio": float(max_ratio),
            "dedup": bool(dedup), "seed": seed, "tests": list(tests)}


@contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.lock`` (waiting for it): two processes preparing one
    folder (two trainings filling the cache at once) would otherwise write the same files."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(f"{out} is being prepared by another process; waiting for it to finish", stacklevel=3)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _claim_folder(out: Path) -> None:
    """Make ``out`` a prepared-data folder: new, empty, or already one (marker file); else refuse."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise DataError(f"--out {out}: a folder that is not a prepared dataset (no {MARKER}); "
                        "choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        (out / MARKER).write_text("a folder written by attnlab prepare; its data is complete when manifest.json exists\n")


def _files_of_manifest(out: Path) -> set[str]:
    """The data files an earlier preparation's manifest lists (none if it cannot be read)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return {info["file"] for info in _manifest_files(manifest) if "/" not in info["file"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _current_report(out: Path, request: dict[str, Any]) -> PrepareReport | None:
    """The stored report if ``out`` holds a complete, intact preparation of ``request``, else None.

    Otherwise the folder's manifest is removed first, so that a preparation killed from here on
    leaves a folder that does not look complete.
    """
    try:
        data = PreparedData.open(out, full_check=True)  # an edited array is not "up to date"
        if json.loads(json.dumps(request)) == data.manifest.get("request"):
            report = PrepareReport.from_dict(json.loads((out / REPORT).read_text(encoding="utf-8")))
            report.up_to_date, report.out = True, out
            return report
    except (DataError, OSError, ValueError, KeyError, TypeError):
        pass
    (out / MANIFEST).unlink(missing_ok=True)
    return None


def _ids_dtype(vocab: BaseVocab) -> str:
    return "<u2" if len(vocab) <= 1 << 16 else "<i4"


def _learn_vocab(source: Source, pairs: int, settings: dict[str, Any],
                 progress: bool) -> tuple[BaseVocab, BaseVocab]:
    """Learn the vocabulary (shared or one per side) from a seeded random sample of training pairs."""
    sample = min(settings["vocab_sample"], pairs)
    rng = np.random.default_rng(settings["seed"])
    chosen = np.sort(rng.choice(pairs, size=sample, replace=False)) if sample < pairs else None

    def sampled(sides: tuple[int, ...]) -> Iterator[str]:
        bar = _bar(progress, sample, "vocabulary sample")
        position = 0
        for i, pair in enumerate(source.pairs()):
            if chosen is not None:
                if position == sample:
                    break
                if chosen[position] != i:
                    continue
                position += 1
            bar.update()
            if pair[0] and pair[1]:
                for side in sides:
                    yield pair[side]
        bar.close()

    def train(texts: Iterator[str]) -> BaseVocab:
        if settings["tokenizer"] == "sentencepiece":
            return SentencePieceVocab.train(texts, settings["vocab_size"], seed=settings["seed"])
        return Vocab.train(texts, settings["vocab_size"])

    if settings["shared_vocab"]:
        shared = train(sampled((0, 1)))
        return shared, shared
    return train(sampled((0,))), train(sampled((1,)))


def _bar(progress: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" pairs", disable=not progress, smoothing=0.1,
                dynamic_ncols=True, leave=False)


# -- encoding: here, or in a pool of single-threaded processes ------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_start(vocab_json: str, dtypes: dict[str, str]) -> None:
    """Pool initializer: this worker's vocabularies, and one encoding thread (the pool is the
    parallelism; the tokenizer's own thread pool would oversubscribe the cores)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this worker process's own setting
    src, tgt = vocabs_from_dict(json.loads(vocab_json))
    _WORKER.update(src=src, tgt=tgt, dtypes=dtypes)


def _worker_encode(texts: tuple[list[str], list[str]]) -> tuple[np.ndarray, ...]:
    return _encode_chunk(_WORKER["src"], _WORKER["tgt"], _WORKER["dtypes"], texts)


def _encode_side(vocab: BaseVocab, texts: list[str]) -> list[list[int]]:
    if isinstance(vocab, Vocab):  # the fast path: ids only, no offsets (same ids as encode_batch)
        encode = getattr(vocab.tokenizer, "encode_batch_fast", vocab.tokenizer.encode_batch)  # tokenizers < 0.20
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return vocab.encode_batch(texts)


def _encode_chunk(src_vocab: BaseVocab, tgt_vocab: BaseVocab, dtypes: dict[str, str],
                  texts: tuple[list[str], list[str]]) -> tuple[np.ndarray, ...]:
    """(src ids, src lengths, tgt ids, tgt lengths) of a chunk: flat arrays, lengths int32."""
    result = []
    for vocab, side, side_texts in ((src_vocab, "src", texts[0]), (tgt_vocab, "tgt", texts[1])):
        encoded = _encode_side(vocab, side_texts)
        lengths = np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded))
        ids = np.fromiter(chain.from_iterable(encoded), dtype=dtypes[side], count=int(lengths.sum()))
        result += [ids, lengths]
    return tuple(result)


def _pool_context():
    """Fork where the platform has it: the workers need nothing but the vocabulary (passed to
    them), and fork, unlike spawn, does not re-import the caller's ``__main__``, so a script
    without an ``if __name__ == "__main__"`` guard works too."""
    methods = get_all_start_methods()
    return get_context("fork" if "fork" in methods else "spawn")


class _Encoder:
    """Encodes chunks in order, with at most a few chunks in flight (memory stays bounded).

    With ``workers`` <= 1 the chunks are encoded on one background thread of this process (the
    tokenizer releases the GIL and runs on its own threads), so that reading and cleaning the next
    chunk and writing the last one overlap with the encoding; with ``workers`` >= 2, in a pool of
    single-threaded processes.
    """

    def __init__(self, src_vocab: BaseVocab, tgt_vocab: BaseVocab, dtypes: dict[str, str], workers: int):
        self.src_vocab, self.tgt_vocab, self.dtypes = src_vocab, tgt_vocab, dtypes
        if workers >= 2:
            vocab_json = json.dumps(vocabs_to_dict(src_vocab, tgt_vocab))
            self.pool: Executor = ProcessPoolExecutor(workers, mp_context=_pool_context(),
                                                      initializer=_worker_start, initargs=(vocab_json, dtypes))
            self.encode = _worker_encode
        else:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="attnlab-encode")
            self.encode = self._encode_here
        self.window = 2 * max(workers, 1)

    def _encode_here(self, texts: tuple[list[str], list[str]]) -> tuple[np.ndarray, ...]:
        return _encode_chunk(self.src_vocab, self.tgt_vocab, self.dtypes, texts)

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(cancel_futures=True)

    def map(self, chunks: Iterator[Any]) -> Iterator[tuple[Any, tuple[np.ndarray, ...]]]:
        """(chunk, encoded) for each chunk of ``chunks`` (whose ``.texts`` are encoded), in order."""
        pending: deque[tuple[Any, Future]] = deque()
        for chunk in chunks:
            pending.append((chunk, self.pool.submit(self.encode, chunk.texts)))
            if len(pending) >= self.window:
                chunk, future = pending.popleft()
                yield chunk, future.result()
        while pending:
            chunk, future = pending.popleft()
            yield chunk, future.result()


# -- one split: clean, encode, write ---------------------------------------------------------------


@dataclass
class _Chunk:
    texts: tuple[list[str], list[str]]
    read: int


class _ArrayFile:
    """A raw array file written chunk by chunk, hashed as it goes."""

    def __init__(self, folder: Path, name: str, dtype: str) -> None:
        self.name, self.dtype = name, dtype
        # Written under a temporary name and renamed into place when complete: a process still
        # reading the previous preparation keeps its own (old) file, never a half-rewritten one.
        self.path, self.partial = folder / name, folder / f".{name}.partial"
        self.file = open(self.partial, "wb")
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.count += len(array)

    def close(self) -> dict[str, Any]:
        self.file.close()
        os.replace(self.partial, self.path)
        return {"file": self.name, "dtype": self.dtype, "count": self.count,
                "size": self.count * np.dtype(self.dtype).itemsize, "sha256": self.hash.hexdigest()}


class _TextFile(_ArrayFile):
    def __init__(self, folder: Path, name: str) -> None:
        super().__init__(folder, name, "<u1")
        self.size = 0

    def write_lines(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        self.file.write(data)
        self.hash.update(data)
        self.size += len(data)

    def close(self) -> dict[str, Any]:
        self.file.close()
        os.replace(self.partial, self.path)
        return {"file": self.name, "size": self.size, "sha256": self.hash.hexdigest()}


def _text_chunks(source: Source, rules: tuple[str, ...], report: SplitReport) -> Iterator[_Chunk]:
    """The source's pairs in chunks, less those dropped by the text rules (empty, duplicate)."""
    seen: set[bytes] = set()
    src, tgt, read = [], [], 0
    for s, t in source.pairs():
        read += 1
        if "empty" in rules and not (s and t):
            report.dropped["empty"] += 1
        elif "duplicate" in rules and _is_duplicate(seen, s, t):
            report.dropped["duplicate"] += 1
        else:
            src.append(s)
            tgt.append(t)
        if read == CHUNK_PAIRS:
            yield _Chunk((src, tgt), read)
            src, tgt, read = [], [], 0
    if read:
        yield _Chunk((src, tgt), read)


def _is_duplicate(seen: set[bytes], src: str, tgt: str) -> bool:
    """True if this exact pair was seen before (a 64-bit hash per distinct pair is kept)."""
    key = hashlib.blake2b(f"{src}\t{tgt}".encode("utf-8"), digest_size=8).digest()
    if key in seen:
        return True
    seen.add(key)
    return False


def _write_split(out: Path, name: str, source: Source, pairs: int, rules: tuple[str, ...],
                 settings: dict[str, Any], encoder: _Encoder, progress: bool) -> tuple[dict, SplitReport]:
    report = SplitReport(dropped={rule: 0 for rule in rules})
    arrays = {(side, part): _ArrayFile(out, f"{name}.{side}.{part}.bin", encoder.dtypes[side] if part == "ids" else "<i8")
              for side in SIDES for part in ("ids", "offsets")}
    texts = {side: _TextFile(out, f"{name}.{side}.txt") for side in SIDES} if name != "train" else None
    ends = {side: 0 for side in SIDES}
    for side in SIDES:
        arrays[side, "offsets"].write(np.zeros(1, dtype=np.int64))
    bar = _bar(progress, pairs, f"encoding {name}")
    max_len, max_ratio = settings["max_len"], settings["max_ratio"]
    try:
        for chunk, (src_ids, src_len, tgt_ids, tgt_len) in encoder.map(_text_chunks(source, rules, report)):
            report.read += chunk.read
            keep = np.ones(len(src_len), dtype=bool)
            if "empty" in rules:  # a side with text but no subword (e.g. only characters NFKC removes)
                no_tokens = (src_len == 0) | (tgt_len == 0)
                report.dropped["empty"] += int(no_tokens.sum())
                keep &= ~no_tokens
            if "too_long" in rules:
                too_long = keep & ((src_len > max_len) | (tgt_len > max_len))
                report.dropped["too_long"] += int(too_long.sum())
                keep &= ~too_long
            if "ratio" in rules:
                longer, shorter = np.maximum(src_len, tgt_len), np.maximum(np.minimum(src_len, tgt_len), 1)
                bad_ratio = keep & (longer > max_ratio * shorter)
                report.dropped["ratio"] += int(bad_ratio.sum())
                keep &= ~bad_ratio
            for side, ids, lengths in (("src", src_ids, src_len), ("tgt", tgt_ids, tgt_len)):
                arrays[side, "ids"].write(ids[np.repeat(keep, lengths)])
                kept_lengths = lengths[keep].astype(np.int64)
                arrays[side, "offsets"].write(ends[side] + np.cumsum(kept_lengths))
                ends[side] += int(kept_lengths.sum())
            if texts is not None:
                for side, side_texts in zip(SIDES, chunk.texts):
                    texts[side].write_lines([t for t, k in zip(side_texts, keep) if k])
            report.kept += int(keep.sum())
            bar.update(chunk.read)
    finally:
        bar.close()
        entry = {"pairs": report.kept, **{side: {part: arrays[side, part].close() for part in ("ids", "offsets")}
                                          for side in SIDES}}
        entry["texts"] = {side: f.close() for side, f in texts.items()} if texts else None
    report.src_tokens, report.tgt_tokens = ends["src"], ends["tgt"]
    if report.kept == 0:
        files = " and ".join(str(f) for f in source.files)
        dropped = ", ".join(f"{rule} {n}" for rule, n in report.dropped.items())
        raise DataError(f"{files}: no sentence pair left in split {name!r} after cleaning "
                        f"(read {report.read}" + (f"; dropped: {dropped}" if dropped else "") + ")")
    return entry, report
