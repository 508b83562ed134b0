"""``attnlab prepare``: clean, learn a vocabulary, encode and write a parallel corpus for training.

    attnlab prepare --src-lang en --tgt-lang cs --train corpus/train --valid corpus/dev \\
        --test newstest2019=corpus/newstest2019 --out data/en-cs

The work happens in ``attnlab.data.prepared.prepare``; this module only maps flags onto it.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``prepare`` subcommand to ``attnlab``'s subparsers."""
    p = sub.add_parser(
        "prepare", help="clean, tokenize and write your own parallel corpus for training",
        description="Prepare a parallel corpus once: clean it (counts reported), learn a subword vocabulary "
        "from a sample, and write memory-mapped token arrays with a manifest into --out. A split is a prefix "
        "PREFIX (files PREFIX.SRC_LANG and PREFIX.TGT_LANG, plain or .gz) or a .tsv/.tsv.gz file "
        "(source<TAB>target). Run again with the same inputs and settings, it does nothing.")
    p.add_argument("--src-lang", required=True, help="source language code (the file suffix), e.g. en")
    p.add_argument("--tgt-lang", required=True, help="target language code, e.g. cs")
    p.add_argument("--train", required=True, metavar="PREFIX_OR_TSV", help="training data")
    p.add_argument("--valid", required=True, metavar="PREFIX_OR_TSV", help="validation data")
    p.add_argument("--test", action="append", default=[], metavar="NAME=PREFIX_OR_TSV",
                   help="a test set, kept whole (repeatable)")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="folder for the prepared data")
    p.add_argument("--tokenizer", default="bpe", choices=("bpe", "sentencepiece"),
                   help="bpe: Hugging Face tokenizers BPE; sentencepiece: unigram (default bpe)")
    p.add_argument("--vocab-size", type=int, default=8000, help="(default 8000)")
    p.add_argument("--separate-vocab", action="store_true", help="one vocabulary per language (default shared)")
    p.add_argument("--vocab-sample", type=int, default=1_000_000, metavar="N",
                   help="learn the vocabulary from N random training pairs (default 1000000)")
    p.add_argument("--max-len", type=int, default=250, metavar="N",
                   help="drop training/validation pairs with a side over N subwords (default 250)")
    p.add_argument("--max-ratio", type=float, default=1.5, metavar="R",
                   help="drop training pairs whose longer side has over R times the subwords of the "
                   "shorter (default 1.5, as fairseq's WMT recipes)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate training pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the vocabulary sample (default 0)")
    p.add_argument("--workers", type=int, default=1,
                   help="encoding processes; 1 encodes in this process on the tokenizer's own threads, "
                   "which was the fastest on 2 cores (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _parse_tests(items: list[str]) -> dict[str, str]:
    tests: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ConfigError(f"--test {item!r}: expected NAME=PREFIX_OR_TSV, e.g. --test newstest2019=data/nt19")
        if name in tests:
            raise ConfigError(f"--test {name}= is given twice")
        tests[name] = spec
    return tests


def run(args: argparse.Namespace) -> int:
    """Prepare the data the flags describe and print the report; 0 on success."""
    from ..data.prepared import prepare

    report = prepare(
        train=args.train, valid=args.valid, out=args.out, src_lang=args.src_lang, tgt_lang=args.tgt_lang,
        tests=_parse_tests(args.test), tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        shared_vocab=not args.separate_vocab, vocab_sample=args.vocab_sample, max_len=args.max_len,
        max_ratio=args.max_ratio, dedup=args.dedup, seed=args.seed, workers=args.workers,
        progress=not args.no_progress,
    )
    print(report.summary())
    return 0
