"""Scoring a checkpoint: any pair of files (--src/--ref), a named test set, sacreBLEU and chrF++.

The command's numbers must be the API's numbers, ``--output`` must hold the translations in input
order, and every bad input ends in one line that names the file or flag.
"""

from __future__ import annotations

import gzip
import re

import pytest
import sacrebleu
from helpers import cli, quiet, small_config

from attnlab.app.evaluate import evaluate_checkpoint, translation_scores
from attnlab.data.corpus import load_multi30k
from attnlab.decode.translate import DecodeConfig, load_translator
from attnlab.train.trainer import train

pytestmark = pytest.mark.filterwarnings("ignore:.*were cut:UserWarning")  # vocabulary of 300, max_len 64

SIGNATURE = r"nrefs:1\|case:{}\|eff:no\|tok:13a\|smooth:exp\|version:\d+\.\d+\.\d+"


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    train(small_config(max_steps=4, eval_every=4), out, progress=False, echo=quiet)
    return out



def test_the_command_prints_the_apis_scores_with_their_signatures(run, tmp_path, capsys):
    output = tmp_path / "hyp.en"
    code, out, err = cli(["evaluate", "--checkpoint", run, "--limit", "20", "--output", output, "--threads", "1"],
                         capsys)
    assert code == 0, err
    name, cased, lower, chrf, timing = out.splitlines()
    assert name.startswith("test set: ") and name.endswith(":test_2016_flickr")  # from the run's prepared data
    assert re.fullmatch(r"BLEU \(cased\) += +\d+\.\d\d +" + SIGNATURE.format("mixed"), cased), cased
    assert re.fullmatch(r"BLEU \(lowercased\) = +\d+\.\d\d +" + SIGNATURE.format("lc"), lower), lower
    assert re.fullmatch(r"chrF2\+\+ += +\d+\.\d\d +nrefs:1\|case:mixed\|eff:yes\|nc:6\|nw:2\|space:no\|version:\S+",
                        chrf), chrf
    assert timing.startswith("20 sentences in ") and timing.endswith("beam 4")

    with pytest.warns(UserWarning, match="were cut"):  # as the command warned, on stderr
        expected = evaluate_checkpoint(run, "test_2016_flickr", DecodeConfig(), limit=20, progress=False)
    assert cased.split() == f"BLEU (cased) = {expected['bleu']:.2f} {expected['signature']}".split()
    assert lower.split() == f"BLEU (lowercased) = {expected['bleu_lc']:.2f} {expected['signature_lc']}".split()
    assert chrf.split() == f"chrF2++ = {expected['chrf']:.2f} {expected['signature_chrf']}".split()
    assert output.read_text(encoding="utf-8") == "".join(h + "\n" for h in expected["hypotheses"])


def test_chrf_is_sacrebleus_chrf_plus_plus():
    hypotheses, references = ["a dog runs in the park", "two men"], ["a dog is running in a park", "two women"]
    scores = translation_scores(hypotheses, references)
    assert scores["chrf"] == round(sacrebleu.corpus_chrf(hypotheses, [references], word_order=2).score, 2)
    assert scores["chrf"] != round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2)  # not plain chrF


def test_any_pair_of_files_is_scored_and_written_in_input_order(run, tmp_path, capsys):
    pairs = load_multi30k("val", "de", "en")[:12]
    src, ref = tmp_path / "mine.de.gz", tmp_path / "mine.en"
    src.write_bytes(gzip.compress("".join(s + "\n" for s, _ in pairs).encode()))
    ref.write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    output = tmp_path / "out.txt"
    code, out, err = cli(["evaluate", "--checkpoint", run, "--src", src, "--ref", ref, "--output", output,
                          "--beam", "1", "--threads", "1"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f"test set: {src}"
    translations = load_translator(run).translate([s for s, _ in pairs], DecodeConfig(beam_size=1))
    assert output.read_text(encoding="utf-8").splitlines() == translations
    scores = translation_scores(translations, [t for _, t in pairs])
    assert f"BLEU (cased)      = {scores['bleu']:.2f}" in out and f"chrF2++           = {scores['chrf']:.2f}" in out


@pytest.mark.parametrize("argv, message", [
    (["--src", "{tmp}/a.de"], "--src and --ref go together"),
    (["--src", "{tmp}/a.de", "--ref", "{tmp}/b.en", "--split", "val"], "either --split or --src/--ref"),
    (["--src", "{tmp}/a.de", "--ref", "{tmp}/short.en"], "line counts differ: {tmp}/a.de has 3 lines, {tmp}/short.en has 2"),
    (["--src", "{tmp}/missing.de", "--ref", "{tmp}/b.en"], "{tmp}/missing.de: no such file"),
    (["--src", "{tmp}/bad.de", "--ref", "{tmp}/b.en"], "{tmp}/bad.de, line 2: invalid UTF-8"),
    (["--split", "newstest2014"], "unknown test set 'newstest2014'; known here: test_2016_flickr, train, val, valid "),
])
def test_bad_test_sets_are_one_line_errors(run, tmp_path, capsys, argv, message):
    (tmp_path / "a.de").write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    (tmp_path / "b.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "short.en").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "bad.de").write_bytes(b"gut\nschlecht \xff\ndrei\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = cli(["evaluate", "--checkpoint", run, *argv], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("attnlab evaluate: error: ")
    assert message.format(tmp=tmp_path) in err


def test_a_prepared_test_set_of_another_vocabulary_is_refused(run, tmp_path, capsys):
    from attnlab.data.prepared import prepare

    pairs = load_multi30k("train", "de", "en")[:300]
    for lang, side in (("de", 0), ("en", 1)):
        (tmp_path / f"c.{lang}").write_text("".join(p[side] + "\n" for p in pairs), encoding="utf-8")
    prepare(train=tmp_path / "c", valid=tmp_path / "c", tests={"mine": tmp_path / "c"}, out=tmp_path / "other",
            src_lang="de", tgt_lang="en", vocab_size=280, progress=False)
    code, out, err = cli(["evaluate", "--checkpoint", run, "--data", tmp_path / "other", "--split", "mine"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'other'}: prepared with another vocabulary than the model in" in err


def test_multi30k_train_split_is_still_scored_from_the_corpus(run, capsys):
    code, out, err = cli(["evaluate", "--checkpoint", run, "--split", "train", "--limit", "3", "--beam", "1",
                          "--threads", "1"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == "test set: Multi30k train"  # the prepared train split keeps no text
