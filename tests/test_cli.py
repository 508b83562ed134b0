"""The command line end to end: train a tiny model, translate (arguments, a file, stdin), evaluate,
explain, plot, the demo; each prints what the Python API gives for the same inputs, and every bad
input ends with exit code 2 and a one-line message, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli
from matplotlib.image import imread

from attnlab.app.cli import main
from attnlab.decode.translate import DecodeConfig, Translator, load_translator

REPO = Path(__file__).resolve().parents[1]

TRAIN_FLAGS = [
    "--train-fraction", "0.01", "--vocab-size", "300", "--d-model", "32", "--num-heads", "2",
    "--num-encoder-layers", "1", "--num-decoder-layers", "1", "--d-ff", "64", "--max-len", "64",
    "--max-tokens", "400", "--warmup", "10", "--eval-sentences", "10", "--threads", "1",
    "--max-steps", "6", "--eval-every", "3", "--average-last", "2", "--time-limit", "0",
]
SENTENCES = [
    "Zwei Hunde spielen im Schnee.",
    "Ein Mann.",
    "Eine Frau mit rotem Hut liest.",
    "Über die Brücke läuft ein Mädchen.",
    "Kinder.",
]



def echo_translations(monkeypatch) -> None:
    """Make every "translation" the source sentence itself (the ids, less EOS, decoded again).

    With the shared vocabulary this shows, whatever a barely trained model says, that each output
    line belongs to its input line, through the length sorting and batching of ``translate``.
    """
    monkeypatch.setattr(Translator, "translate_ids", lambda self, sources, config=DecodeConfig(): [s[:-1] for s in sources])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode on one thread: on a machine busy with other work, two threads made beam search 80x
    slower (8 s against 0.1 s for one sentence). The test session gets its own count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", *TRAIN_FLAGS])
    assert code == 0, stdout.getvalue()
    assert "summary: " in stdout.getvalue() and "stop_reason=reached max_steps=6" in stdout.getvalue()
    return out


@pytest.fixture(scope="module")
def translator(run) -> Translator:
    """The run's model through the Python API, to hold the command line's output against."""
    return load_translator(run)


def api_translations(translator: Translator, sentences: list[str], beam: int = 4) -> str:
    """What ``attnlab translate --beam BEAM`` should print for ``sentences``: one line each."""
    return "".join(line + "\n" for line in translator.translate(sentences, DecodeConfig(beam_size=beam)))


def test_train_writes_a_run(run):
    pointer = json.loads((run / "checkpoints.json").read_text())
    assert pointer["last"] == "ckpt/step-0000006"
    assert pointer["model"] in ("ckpt/averaged", "ckpt/step-0000003", "ckpt/step-0000006")
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["preset"] == "tiny" and config["train"]["d_model"] == 32
    assert config["train"]["max_steps"] == 6 and config["train"]["threads"] == 1


# -- translate --------------------------------------------------------------------------------------
def test_translate_a_sentence_argument(run, translator, capsys):
    sentence = "Ein Hund rennt durch den Park."
    code, out, err = cli(["translate", "--checkpoint", run, "--threads", "1", sentence], capsys)
    assert code == 0, err
    assert out == api_translations(translator, [sentence])
    assert out.strip()  # the comparison covered a real translation, not two empty lines


def test_translate_warns_in_one_line_when_a_sentence_is_cut(run, translator, capsys):
    long = " ".join(["Ein Hund rennt durch den Park."] * 20)  # far more than the model's 63 subwords
    code, out, err = cli(["translate", "--checkpoint", run, "--threads", "1", "Ein Mann.", long], capsys)
    assert code == 0, err
    assert err.strip().splitlines() == [
        "attnlab translate: warning: 1 source sentence(s) (the first is number 2) are longer than the "
        "model's 63 subwords and were cut; their translations cover the start only"
    ]
    with pytest.warns(UserWarning, match="were cut"):
        assert out == api_translations(translator, ["Ein Mann.", long])


def test_translate_a_file_keeps_lines_and_the_empty_one(run, translator, tmp_path, capsys):
    lines = ["Ein Mann.", "", "Zwei Hunde spielen im Schnee.", "Eine Frau sitzt auf einer Bank."]
    source = tmp_path / "in.de"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = cli(["translate", "--checkpoint", run, "--input", source, "--beam", "2", "--threads", "1"],
                         capsys)
    assert code == 0, err
    assert out == api_translations(translator, lines, beam=2)
    assert out.split("\n")[1] == ""  # the empty line stays empty, in its place


def test_translate_a_file_keeps_the_order(run, tmp_path, capsys, monkeypatch):
    echo_translations(monkeypatch)
    lines = [SENTENCES[0], "", SENTENCES[1], SENTENCES[2], "   ", SENTENCES[3], SENTENCES[4]]
    source = tmp_path / "in.de"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = cli(["translate", "--checkpoint", run, "--input", source, "--batch-size", "2"], capsys)
    assert code == 0, err
    assert out.split("\n")[:-1] == [line.strip() for line in lines]


def test_translate_reads_stdin(run, capsys, monkeypatch):
    echo_translations(monkeypatch)
    for extra in ([], ["--input", "-"]):
        stdin = io.TextIOWrapper(io.BytesIO(("\n".join(SENTENCES[:3]) + "\n").encode("utf-8")), encoding="utf-8")
        monkeypatch.setattr(sys, "stdin", stdin)
        code, out, err = cli(["translate", "--checkpoint", run, "--batch-size", "1", *extra], capsys)
        assert code == 0, err
        assert out.split("\n")[:-1] == SENTENCES[:3]


def test_translate_in_a_real_process_from_stdin(run, translator):
    result = subprocess.run(
        [sys.executable, "-m", "attnlab", "translate", "--checkpoint", str(run), "--beam", "1", "--threads", "1"],
        input="Ein Mann schläft.\n\nZwei Kinder spielen.\n", capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == api_translations(translator, ["Ein Mann schläft.", "", "Zwei Kinder spielen."], beam=1)


# -- explain (evaluate: tests/test_evaluate.py) ----------------------------------------------------
def test_explain_simple_prints_the_tutorials_digits(capsys):
    code, out, err = cli(["explain", "--example", "simple"], capsys)
    assert code == 0, err
    assert "[0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]" in out  # scores, row 2
    assert "[0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]" in out  # weights, row 2
    assert "[0.4419, 0.6515, 0.5683]" in out  # context vector of token 2


def test_explain_a_checkpoint_writes_heatmaps_and_the_report(run, translator, tmp_path, capsys):
    sentence = "Ein Mann fährt Fahrrad."
    out_dir = tmp_path / "explain"
    code, out, err = cli(["explain", "--checkpoint", run, sentence, "--out", out_dir, "--threads", "1"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"source:      {sentence}"
    assert lines[1] == "translation: " + api_translations(translator, [sentence]).rstrip("\n")
    assert lines[2] == "most attended source tokens (last layer, heads averaged):"
    # One encoder layer and one decoder layer: encoder, decoder and cross maps, one PNG each.
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == ["cross_layer1.png", "decoder_layer1.png", "encoder_layer1.png"]
    assert lines[-1] == f"wrote 3 heatmaps and the report: {out_dir / 'report.html'}"
    assert (out_dir / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    top = lines[3:-1]  # one line per output token: the translation's tokens and <eos>
    assert len(top) >= 1 and all("  ->  " in line for line in top)


# -- plot -------------------------------------------------------------------------------------------
def test_plot_positional_encoding_writes_the_png(tmp_path, capsys):
    path = tmp_path / "figures" / "pe.png"
    code, out, err = cli(["plot", "positional-encoding", "--d-model", "16", "--positions", "40", "--out", path],
                         capsys)
    assert code == 0, err
    assert out == f"{path}\n"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape == (450, 1100, 4)  # an 11 x 4.5 inch figure at 100 dots per inch
    code, _, err = cli(["plot", "positional-encoding", "--d-model", "16", "--positions", "0", "--out", path], capsys)
    assert code == 2 and "positions must be positive" in err


# -- bad inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope", "--out", "{tmp}/new"], "invalid choice: 'nope'"),
        (["train", "--preset", "tiny", "--out", "{tmp}/new", "--max-tokens", "0"], "setting max_tokens must be >= 1, got 0"),
        (["train", "--preset", "tiny", "--out", "{tmp}/new", "--dropout", "lots"], "invalid float value: 'lots'"),
        (["train", "--preset", "tiny", "--out", "{run}"], "pass --resume"),
        (["translate", "--checkpoint", "{tmp}/missing", "Hallo"], "does not exist"),
        (["translate", "Hallo"], "required: --checkpoint"),
        (["translate", "--checkpoint", "{tmp}", "Hallo"], "neither a checkpoint"),
        (["translate", "--checkpoint", "{run}", "--beam", "0", "Hallo"], "beam_size must be >= 1"),
        (["evaluate", "--checkpoint", "{tmp}/missing"], "does not exist"),
        (["explain"], "give either --example"),
        (["demo", "--out", "{tmp}/new", "--minutes", "0"], "minutes must be positive, got 0.0"),
        (["demo", "--out", "{tmp}/new", "--test-sentences", "0"], "test_sentences must be at least 1, got 0"),
        (["demo", "--out", "{tmp}/new", "--train-fraction", "1.5"], "train_fraction must be in (0, 1], got 1.5"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_input_gives_exit_code_2_and_one_line(argv, message, run, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    code, _, err = cli(argv, capsys)
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("attnlab") and "error: " in err and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()  # a refused run leaves nothing behind



# -- the demo ---------------------------------------------------------------------------------------
def test_a_short_demo_trains_translates_scores_and_writes_the_report(tmp_path, capsys, monkeypatch):
    from attnlab.app import demo
    from attnlab.data.corpus import load_multi30k
    from attnlab.train.presets import get_preset

    # One training thread, as everywhere in this file (the preset's threads=0 takes every core).
    monkeypatch.setattr(demo, "get_preset", lambda name: get_preset(name).override(threads=1))
    out = tmp_path / "demo"
    code, stdout, err = cli(["demo", "--out", out, "--minutes", "0.1", "--train-fraction", "0.01",
                             "--test-sentences", "5", "--shown", "2"], capsys)
    assert code == 0, err
    assert "Training the 'tiny' preset: German -> English, at most 0.1 minutes, on 1% of the data" in stdout
    shown = re.findall(r"^source: +(.*)\nmodel: +(.*)\nreference: +(.*)$", stdout, re.MULTILINE)
    pairs = load_multi30k("test_2016_flickr", "de", "en")[:2]
    assert [(source, reference) for source, _, reference in shown] == pairs
    translations = load_translator(out).translate([source for source, _ in pairs], DecodeConfig(beam_size=4))
    assert [model for _, model, _ in shown] == translations
    assert re.search(r"^test_2016_flickr BLEU: \d+\.\d\d cased, \d+\.\d\d lowercased \(5 sentences, ",
                     stdout, re.MULTILINE), stdout
    report = out / "explain" / "report.html"
    assert f"report:   {report.resolve()}" in stdout
    assert report.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert len(list((out / "explain").glob("*.png"))) == 3 * 2  # encoder, decoder, cross: 2 layers each


# -- a user's own corpus: prepare, train --data, evaluate --src/--ref, translate ------------------------
def test_own_corpus_from_plain_files_to_translations(tmp_path, capsys):
    """French->German, a pair no preset knows: Multi30k sentences copied out as a user's own files."""
    from attnlab.data.corpus import load_multi30k

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, name, n in (("train", "train", 400), ("val", "valid", 40), ("test_2016_flickr", "test", 8)):
        pairs = load_multi30k(split, "fr", "de")[:n]
        for side, lang in ((0, "fr"), (1, "de")):
            (corpus / f"{name}.{lang}").write_text("".join(p[side] + "\n" for p in pairs), encoding="utf-8")
    data = tmp_path / "prepared"
    code, out, err = cli(["prepare", "--src-lang", "fr", "--tgt-lang", "de", "--train", corpus / "train",
                          "--valid", corpus / "valid", "--test", f"flickr={corpus / 'test'}", "--out", data,
                          "--vocab-size", "300", "--no-progress"], capsys)
    assert code == 0, err
    assert f"prepared {data} in " in out and "train: read 400, kept " in out

    code, out, err = cli(["train", "--data", data, "--src-lang", "fr", "--out", tmp_path / "no"], capsys)
    assert code == 2 and "--src-lang does not apply with --data" in err and not (tmp_path / "no").exists()

    run = tmp_path / "run"
    flags = [f for f in TRAIN_FLAGS if f not in ("--vocab-size", "300", "--train-fraction", "0.01")]
    code, out, err = cli(["train", "--preset", "tiny", "--data", data, "--out", run, "--no-progress", *flags], capsys)
    assert code == 0, err
    assert f"{data.resolve()} fr->de: " in out and "stop_reason=reached max_steps=6" in out
    assert json.loads((run / "config.json").read_text())["train"]["task"]["src_lang"] == "fr"

    code, out, err = cli(["evaluate", "--checkpoint", run, "--src", corpus / "test.fr", "--ref", corpus / "test.de",
                          "--output", tmp_path / "hyp.de", "--threads", "1"], capsys)
    assert code == 0, err
    translator = load_translator(run)
    sources = (corpus / "test.fr").read_text(encoding="utf-8").splitlines()
    expected = translator.translate(sources, DecodeConfig())
    assert (tmp_path / "hyp.de").read_text(encoding="utf-8").splitlines() == expected
    code, out, err = cli(["evaluate", "--checkpoint", run, "--split", "flickr", "--threads", "1"], capsys)
    assert code == 0 and out.splitlines()[0] == f"test set: {data.resolve()}:flickr"

    code, out, err = cli(["translate", "--checkpoint", run, sources[0], "--threads", "1"], capsys)
    assert code == 0 and out == expected[0] + "\n"
