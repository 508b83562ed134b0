"""The ``attnlab`` command line: thin wrappers that parse arguments and call importable functions.

    attnlab train --preset multi30k-de-en --out runs/de-en
    attnlab translate --checkpoint runs/de-en "Ein Hund rennt durch den Park."
    attnlab evaluate --checkpoint runs/de-en --split test_2016_flickr
    attnlab prepare --src-lang fr --tgt-lang de --train corpus/train --valid corpus/valid --out prepared/fr-de
    attnlab train --data prepared/fr-de --out runs/fr-de
    attnlab evaluate --checkpoint runs/fr-de --src test.fr --ref test.de
    attnlab explain --example tutorial --scale 1
    attnlab explain --checkpoint runs/de-en "Ein Mann fährt Fahrrad."
    attnlab plot positional-encoding --d-model 32 --positions 60
    attnlab train --preset shakespeare-char --out runs/shakespeare
    attnlab generate --checkpoint runs/shakespeare --prompt "ROMEO:" --max-new-tokens 500
    attnlab demo
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence, get_type_hints

from .process import set_process_defaults

__all__ = ["main", "build_parser"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _setting_fields() -> dict[str, tuple[type, object]]:
    """Every training setting (common and per task) with its type and default, from the dataclasses."""
    from ..train.config import TASK_SETTINGS, TrainConfig

    found: dict[str, tuple[type, object]] = {}
    for cls in (TrainConfig, *TASK_SETTINGS.values()):
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name not in ("task", "preset") and f.name not in found:
                found[f.name] = (hints[f.name], f.default)
    return found


def _add_train(sub: argparse._SubParsersAction) -> None:
    from ..train.config import TASK_SETTINGS, setting_names
    from ..train.presets import PRESETS

    p = sub.add_parser("train", help="train a model (a preset, with any setting overridden)",
                       description="Train a translation or language model from a preset; every setting that "
                       "applies to the preset's task can be overridden by its flag. With --resume, the run "
                       "continues with its own settings; only the length of the run and the machine may change.")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="(default multi30k-de-en)")
    p.add_argument("--out", required=True, help="run directory for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    hints = _setting_fields()
    groups = {"common": p.add_argument_group("settings of every task (override the preset)")}
    for kind in TASK_SETTINGS:
        groups[kind] = p.add_argument_group(f"{kind} settings")
    common = set(setting_names("translation")) & set(setting_names("lm"))
    for name, (kind, default) in hints.items():
        group = groups["common"] if name in common else groups["lm" if name in setting_names("lm") else "translation"]
        parse = _parse_bool if kind is bool else kind
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"set_{name}", type=parse, default=None,
                           metavar=kind.__name__.upper(), help=f"(default {default!r})")


# Settings a prepared dataset decides (`--data`): giving them as well is a mistake worth naming.
DATA_FIXES = ("src_lang", "tgt_lang", "vocab_size", "shared_vocab", "data_dir")


@command("train")
def _train(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..train.presets import get_preset
    from ..train.trainer import resume, train

    changes = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    progress = not args.no_progress
    if args.resume:
        if args.preset:
            raise ValueError("--preset does not apply to --resume: the run continues with its own settings")
        summary = resume(args.out, progress=progress, **changes)
    else:
        if changes.get("data"):
            fixed = [f"--{name.replace('_', '-')}" for name in DATA_FIXES if name in changes]
            if fixed:
                raise ConfigError(f"{', '.join(fixed)} does not apply with --data: the prepared data in "
                                  f"{changes['data']} brings its own languages and vocabulary")
        config = get_preset(args.preset or "multi30k-de-en").override(**changes)
        summary = train(config, args.out, progress=progress)
    if summary:
        print("summary: " + "  ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _add_decode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint directory")
    p.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default 4)")
    p.add_argument("--alpha", type=float, default=0.6, help="length penalty (default 0.6)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="sentences decoded together (default 0: by tokens: length-sorted sentences fill a batch "
                        "while sentences x beam x its longest source stays within "
                        "attnlab.decode.translate.DECODE_TOKENS and sentences x beam within DECODE_ROWS)")
    p.add_argument("--no-cache", action="store_true", help="decode without the KV cache (slow; for comparison)")
    p.add_argument("--device", default="cpu")
    _add_int8_flag(p)
    _add_threads_flag(p)


def _add_int8_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8", action="store_true",
                   help="decode on int8 weights (dynamic quantization; CPU; faster, BLEU within noise)")


def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: all cores; 1 is faster on a machine busy with other work)")


def _set_threads(args: argparse.Namespace) -> None:
    """Set the process's thread count (a program's setting, made here) and check --device."""
    import torch

    from ..errors import ConfigError

    cores = os.cpu_count() or 1
    if not 0 <= args.threads <= 64 * cores:  # PyTorch's thread pools crash on tens of thousands
        raise ConfigError(f"--threads must be from 0 (all {cores} cores) to {64 * cores}, got {args.threads}")
    torch.set_num_threads(args.threads or cores)
    device = getattr(args, "device", "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: attnlab runs on cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: PyTorch sees no CUDA GPU on this machine; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _read_stdin_lines() -> list[str]:
    """Standard input as stripped lines (as ``read_lines`` reads files), strictly UTF-8."""
    from ..errors import DataError

    lines = []
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"standard input, line {number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at "
                            f"column {e.start + 1}: {e.reason})") from None
        lines.append((line.removeprefix("\ufeff") if number == 1 else line).strip())
    return lines


def _decode_config(args: argparse.Namespace):
    from ..decode.translate import DecodeConfig

    return DecodeConfig(beam_size=args.beam, alpha=args.alpha, batch_size=args.batch_size,
                        use_cache=not args.no_cache)


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate sentences (arguments, --input file, or stdin)")
    _add_decode_flags(p)
    p.add_argument("sentences", nargs="*", help="sentences to translate; none: read --input or stdin")
    p.add_argument("--input", help="a file with one sentence per line ('-' for stdin)")


@command("translate")
def _translate(args: argparse.Namespace) -> int:
    from ..decode.translate import load_translator

    if args.sentences and args.input:
        raise ValueError("give sentences as arguments or --input, not both")
    if args.sentences:
        lines = list(args.sentences)
    elif args.input and args.input != "-":
        from ..data.corpus import read_lines

        lines = read_lines(args.input)
    else:
        lines = _read_stdin_lines()
    _set_threads(args)
    translator = load_translator(args.checkpoint, args.device, int8=args.int8)
    for line in translator.translate(lines, _decode_config(args)):
        print(line)
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from . import prepare

    prepare.add_parser(sub)


@command("prepare")
def _prepare(args: argparse.Namespace) -> int:
    from . import prepare

    return prepare.run(args)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="sacreBLEU and chrF++ of a checkpoint on a test set (files or a named split)",
                       description="Translate a test set and score it with sacreBLEU (cased and -lc) and chrF2++. "
                       "The test set is two files (--src, --ref) or a split by name: one that `attnlab prepare` "
                       "registered in the run's prepared data (or --data), or a bundled Multi30k split.")
    _add_decode_flags(p)
    p.add_argument("--split", default=None,
                   help="a test set by name (default test_2016_flickr); see the description")
    p.add_argument("--src", help="source sentences, one per line (plain or .gz)")
    p.add_argument("--ref", help="reference translations, aligned with --src")
    p.add_argument("--data", default=None, help="a prepared-data folder whose test sets --split names")
    p.add_argument("--data-dir", default=None, help="the folder holding multi30k/ (default: the bundled corpora)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N sentences")
    p.add_argument("--output", help="also write the translations to this file, in input order")


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    _set_threads(args)
    result = evaluate_checkpoint(args.checkpoint, args.split, _decode_config(args), src=args.src, ref=args.ref,
                                 data=args.data, device=args.device, data_dir=args.data_dir, limit=args.limit,
                                 output=args.output, int8=args.int8)
    print(f"test set: {result['test_set']}")
    print(f"BLEU (cased)      = {result['bleu']:.2f}   {result['signature']}")
    print(f"BLEU (lowercased) = {result['bleu_lc']:.2f}   {result['signature_lc']}")
    print(f"chrF2++           = {result['chrf']:.2f}   {result['signature_chrf']}")
    print(f"{result['sentences']} sentences in {result['seconds']:.1f} s "
          f"({result['sentences_per_s']:.1f} sentences/s), beam {args.beam}" + (", int8" if args.int8 else ""))
    return 0


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="walk through attention step by step, or inside a trained model",
                       description="With --example: print every step of a worked example from the "
                       "tutorials. With --checkpoint and a sentence: translate it and write attention "
                       "heatmaps (PNG) and an HTML report, and print the most attended source tokens.")
    p.add_argument("--example", choices=["simple", "trainable", "tutorial"])
    p.add_argument("--scale", type=float, default=None,
                   help="score scale for --example tutorial (1.0 reproduces the tutorial; default 1/sqrt(d_k))")
    p.add_argument("--checkpoint", help="a translation run or checkpoint directory")
    p.add_argument("sentence", nargs="?", help="the sentence to translate and explain")
    p.add_argument("--out", default=None, help="folder for the PNGs and report.html (default: explain/ in the run)")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--device", default="cpu")
    _add_threads_flag(p)


@command("explain")
def _explain(args: argparse.Namespace) -> int:
    if bool(args.example) == bool(args.checkpoint):
        raise ValueError("give either --example NAME or --checkpoint DIR with a sentence")
    if args.example:
        from ..inspect.explain import explain_example

        print(explain_example(args.example, args.scale))
        return 0
    if not args.sentence:
        raise ValueError("--checkpoint needs a sentence to translate, e.g. \"Ein Mann fährt Fahrrad.\"")
    from ..decode.translate import DecodeConfig, load_translator
    from ..inspect.explain import explain_translation

    _set_threads(args)
    translator = load_translator(args.checkpoint, args.device)
    config = DecodeConfig(beam_size=args.beam)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "explain"
    result = explain_translation(
        translator.model, translator.src_vocab, translator.tgt_vocab, args.sentence, out,
        lambda s: translator.translate_ids(translator.encode_source([s]), config)[0],
    )
    print(f"source:      {args.sentence}")
    print(f"translation: {result.translation}")
    print("most attended source tokens (last layer, heads averaged):")
    print(result.top_attended)
    print(f"wrote {len(result.pngs)} heatmaps and the report: {result.report}")
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw figures: the positional-encoding table")
    p.add_argument("what", choices=["positional-encoding"])
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--positions", type=int, default=60)
    p.add_argument("--out", default="positional_encoding.png")


@command("plot")
def _plot(args: argparse.Namespace) -> int:
    from ..inspect.plots import plot_positional_encoding

    print(plot_positional_encoding(d_model=args.d_model, positions=args.positions, path=args.out))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write text with a trained language model")
    p.add_argument("--checkpoint", required=True, help="a language-model run or checkpoint directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="repeatable output")
    p.add_argument("--no-cache", action="store_true", help="re-read the context at every step (slow)")
    p.add_argument("--device", default="cpu")
    _add_threads_flag(p)


@command("generate")
def _generate(args: argparse.Namespace) -> int:
    import torch

    from ..decode.generate import encode_prompt, generate, load_language_model

    _set_threads(args)
    model, vocab = load_language_model(args.checkpoint, args.device)
    prompt = torch.tensor([encode_prompt(vocab, args.prompt)], device=args.device)
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)
    print(vocab.decode(out[0].tolist()))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .serve_config import ServeConfig, serve_config_fields

    p = sub.add_parser("serve", help="serve trained models over HTTP (JSON API and an attention page)",
                       description="Serve translation and language models: POST /v1/translate, POST /v1/generate, "
                       "GET /v1/models, GET /health, and a page at / to translate and see every attention map. "
                       "Concurrent requests are decoded in micro-batches. Listens on 127.0.0.1 unless told "
                       "otherwise; any other address needs --api-key or --no-auth.")
    p.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]RUN",
                   help="a run or checkpoint directory, optionally named (repeat for several models)")
    p.add_argument("--host", default=ServeConfig.host, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=ServeConfig.port, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="required on every /v1 request (default: the ATTNLAB_API_KEY environment variable)")
    p.add_argument("--no-auth", action="store_true", help="serve a non-loopback address without an API key")
    p.add_argument("--no-batching", action="store_true", help="decode each request alone (for comparison)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--device", default="cpu")
    _add_int8_flag(p)
    _add_threads_flag(p)
    limits = p.add_argument_group("batching and limits")
    for name, kind, default in serve_config_fields():
        limits.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, metavar=kind.__name__.upper(),
                            help=f"(default {default!r})")


@command("serve")
def _serve(args: argparse.Namespace) -> int:
    from .serve import serve
    from .serve_config import ServeConfig, serve_config_fields

    settings = {name: getattr(args, name) for name, _, _ in serve_config_fields()}
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get("ATTNLAB_API_KEY"),
                         no_auth=args.no_auth, batching=not args.no_batching, access_log=args.access_log, **settings)
    _set_threads(args)
    return serve(args.checkpoint, config, device=args.device, int8=args.int8)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the guided tour: worked examples, a tiny translation model, a report",
                       description="Train the tiny preset, translate and score the test set, and write "
                       "the attention maps of one translation. The flags make a shorter tour.")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--shown", type=int, default=5, help="test translations printed (default 5)")
    p.add_argument("--minutes", type=float, default=None, help="minutes of training (default: the preset's 6)")
    p.add_argument("--train-fraction", type=float, default=None,
                   help="share of the training data used, in (0, 1] (default: all)")
    p.add_argument("--test-sentences", type=int, default=None,
                   help="score only the first N test sentences (default: all 1000)")


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), args.shown, minutes=args.minutes, train_fraction=args.train_fraction,
             test_sentences=args.test_sentences)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a translation model for another inference engine (CTranslate2)",
                       description="Write a translation checkpoint as a CTranslate2 model directory, with its "
                       "vocabularies and tokenizers (needs pip install 'attnlab[ctranslate2]').")
    p.add_argument("--format", required=True, choices=["ctranslate2"], help="the engine to export for")
    p.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint directory")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--quantization", default=None,
                   help="store weights as int8, int16, float16, ... (default: float32; CTranslate2 can also "
                   "quantize when loading, compute_type='int8')")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


@command("export")
def _export(args: argparse.Namespace) -> int:
    from ..decode.export import export_ctranslate2

    out = export_ctranslate2(args.checkpoint, args.out, quantization=args.quantization, force=args.force)
    print(f"wrote the CTranslate2 model, its vocabularies and tokenizers to {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Reports a usage mistake in one line on stderr (exit code 2), like every other error;
    the full usage of ``attnlab train`` runs to some twenty lines and buries the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnlab", description="Build, train, inspect and run Transformer attention models."
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback rather than one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare, _add_train, _add_translate, _add_evaluate, _add_generate, _add_explain, _add_plot, _add_serve,
                _add_demo, _add_export):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    set_process_defaults()  # the program's settings (attnlab.app.process), before torch loads
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # attnlab's warnings as one line each, like its errors
        warnings.showwarning = _one_line_warning(args.command)
        return _run(args)


def _one_line_warning(command: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"attnlab {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


def _run(args: argparse.Namespace) -> int:
    """Run a command; every error becomes one line on stderr and a non-zero exit code.

    Exit codes: 2 for a problem the user can fix (attnlab's own errors, bad values, files that
    cannot be read or written), 128 + N when signal N stopped training (after its checkpoint),
    130 for Ctrl-C elsewhere, 1 for anything unexpected (with --debug: the traceback).
    """
    from ..errors import AttnlabError, TrainingInterrupted

    prefix = f"attnlab {args.command}"
    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as stop:
        print(f"{prefix}: {stop}", file=sys.stderr)
        return 128 + stop.signal_number
    except BrokenPipeError:  # the reader went away (`attnlab ... | head`): stop quietly
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except (AttnlabError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"{prefix}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug, or a failure deep inside a library: still one line
        if args.debug:
            raise
        print(f"{prefix}: internal error: {type(error).__name__}: {_one_line(error)} "
              "(run 'attnlab --debug ...' for the traceback)", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split())
    return text or type(error).__name__
