"""Training settings: per-task sections, validation of every field, JSON round trips, presets."""

import math

import pytest

from attnlab.train.config import (
    LanguageModelSettings,
    TrainConfig,
    TranslationSettings,
    setting_names,
)
from attnlab.train.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    config = get_preset(name)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_each_task_has_its_own_names():
    assert get_preset("tiny").task.num_encoder_layers == 2
    lm = get_preset("shakespeare-char")
    assert isinstance(lm.task, LanguageModelSettings) and lm.kind == "lm"
    assert (lm.task.num_layers, lm.task.context, lm.task.batch_size) == (4, 64, 12)
    assert "context" not in setting_names("translation") and "src_lang" not in setting_names("lm")
    assert "num_layers" in setting_names() and "num_encoder_layers" in setting_names()


def test_override_routes_settings_to_the_task_or_the_common_part():
    config = get_preset("tiny").override(max_tokens=100, d_model=64, src_lang="en", tgt_lang="fr")
    assert (config.task.max_tokens, config.d_model, config.task.src_lang) == (100, 64, "en")
    assert get_preset("tiny").task.max_tokens == 2048  # presets are never changed


@pytest.mark.parametrize("preset, setting, owner", [
    ("tiny", "context", "language-model"), ("tiny", "num_layers", "language-model"),
    ("shakespeare-char", "num_encoder_layers", "translation"), ("shakespeare-char", "src_lang", "translation"),
])
def test_a_setting_of_the_other_task_is_rejected_by_name(preset, setting, owner):
    with pytest.raises(ValueError, match=f"setting {setting} belongs to {owner} training"):
        get_preset(preset).override(**{setting: 1})


def test_an_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="unknown training setting 'colour'"):
        get_preset("tiny").override(colour=1)


@pytest.mark.parametrize("changes, message", [
    ({"lr": -1.0}, "lr must be > 0"),
    ({"lr": math.nan}, "lr must be a finite number"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"patience": -1}, "patience must be >= 0"),
    ({"time_limit": -5.0}, "time_limit must be >= 0"),
    ({"eval_every": -2}, "eval_every must be >= 0"),
    ({"eval_sentences": -3}, "eval_sentences must be >= 0"),
    ({"num_encoder_layers": -1}, "num_encoder_layers must be >= 1"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\)"),
    ({"seed": 2**70}, r"seed must be in \[0, 2\*\*63\)"),
    ({"threads": -1}, "threads must be >= 0"),
    ({"device": "bogus"}, "device must be one of"),
    ({"d_model": 30, "num_heads": 4}, "d_model must be divisible by num_heads=4"),
    ({"shared_vocab": "false"}, "shared_vocab must be bool"),
    ({"max_tokens": 2.5}, "max_tokens must be int"),
    ({"src_lang": "en", "tgt_lang": "en"}, "source and target language are both 'en'"),
])
def test_every_setting_is_validated_where_it_is_defined(changes, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny").override(**changes)


def test_from_dict_names_the_source_and_rejects_what_does_not_fit():
    data = get_preset("tiny").to_dict()
    with pytest.raises(ValueError, match=r"run/config.json: unknown settings \['colour'\]"):
        TrainConfig.from_dict({**data, "colour": 1}, "run/config.json")
    with pytest.raises(ValueError, match=r"task \(translation\): unknown settings \['context'\]"):
        TrainConfig.from_dict({**data, "task": {**data["task"], "context": 3}})
    with pytest.raises(ValueError, match="expected an object"):
        TrainConfig.from_dict([1, 2], "x.json")
    with pytest.raises(ValueError, match="before 0.2"):
        TrainConfig.from_dict({**data, "task": "translation"})


def test_for_task_builds_either_kind():
    assert TrainConfig.for_task("lm", context=8).task == LanguageModelSettings(context=8)
    assert TrainConfig.for_task("translation", vocab_size=100).task == TranslationSettings(vocab_size=100)
    with pytest.raises(ValueError, match="unknown task"):
        TrainConfig.for_task("vision")
