"""The ``attnlab`` command line: thin wrappers that parse arguments and call importable functions.

    attnlab train --preset multi30k-de-en --out runs/de-en
    attnlab translate --checkpoint runs/de-en "Ein Hund rennt durch den Park."
    attnlab evaluate --checkpoint runs/de-en --split test_2016_flickr
    attnlab demo
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


def _flag_type(annotation: str):
    return {"int": int, "float": float, "str": str}.get(annotation)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .config import TrainConfig
    from .presets import PRESETS

    p = sub.add_parser("train", help="train a model (a preset, with any setting overridden)",
                       description="Train a translation or language model. Every setting of the "
                       "preset can be overridden by its flag; defaults shown are TrainConfig's.")
    p.add_argument("--preset", default="multi30k-de-en", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="run directory for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    group = p.add_argument_group("settings (override the preset)")
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        kind = _parse_bool if f.type == "bool" else _flag_type(f.type)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"set_{f.name}", type=kind,
                           default=None, metavar=f.type.upper(), help=f"(default {f.default!r})")


@command("train")
def _train(args: argparse.Namespace) -> int:
    from .presets import get_preset
    from .training import train

    config = get_preset(args.preset)
    changes = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    config = config.override(**changes)
    summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    if summary:
        print("summary: " + "  ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _add_decode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint directory")
    p.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default 4)")
    p.add_argument("--alpha", type=float, default=0.6, help="length penalty (default 0.6)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-cache", action="store_true", help="decode without the KV cache (slow; for comparison)")
    p.add_argument("--device", default="cpu")


def _decode_config(args: argparse.Namespace):
    from .translate import DecodeConfig

    return DecodeConfig(beam_size=args.beam, alpha=args.alpha, batch_size=args.batch_size,
                        use_cache=not args.no_cache)


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate sentences (arguments, --input file, or stdin)")
    _add_decode_flags(p)
    p.add_argument("sentences", nargs="*", help="sentences to translate; none: read --input or stdin")
    p.add_argument("--input", help="a file with one sentence per line ('-' for stdin)")


@command("translate")
def _translate(args: argparse.Namespace) -> int:
    from .translate import load_translator

    if args.sentences and args.input:
        raise ValueError("give sentences as arguments or --input, not both")
    if args.sentences:
        lines = list(args.sentences)
    elif args.input and args.input != "-":
        from .corpus import read_lines

        lines = read_lines(args.input)
    else:
        lines = [line.rstrip("\n") for line in sys.stdin]
    translator = load_translator(args.checkpoint, args.device)
    for line in translator.translate(lines, _decode_config(args)):
        print(line)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="sacreBLEU of a checkpoint on a Multi30k split")
    _add_decode_flags(p)
    p.add_argument("--split", default="test_2016_flickr", choices=["train", "val", "test_2016_flickr"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=0, help="score only the first N sentences")
    p.add_argument("--output", help="also write the translations to this file")


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.split, _decode_config(args), device=args.device,
                                 data_dir=args.data_dir, limit=args.limit, output=args.output)
    print(f"BLEU (cased)      = {result['bleu']:.2f}   {result['signature']}")
    print(f"BLEU (lowercased) = {result['bleu_lc']:.2f}   {result['signature_lc']}")
    print(f"{result['sentences']} sentences in {result['seconds']:.1f} s "
          f"({result['sentences_per_s']:.1f} sentences/s), beam {args.beam}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the guided tour: worked examples, a tiny translation model, a report")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnlab", description="Build, train, inspect and run Transformer attention models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_translate, _add_evaluate, _add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"attnlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnlab {args.command}: interrupted", file=sys.stderr)
        return 130
