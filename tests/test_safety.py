"""The image check's parts: the policy's decisions (pure), the classifier's loading and its
failures, ``[safety]`` in config.toml, the start that stops on a missing classifier, and the
hostile upload corpus through the classifier."""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import replace

import pytest

from bot.config import load_config
from bot.inputs import BadInput, limit_pillow, load_init_image
from bot.safety.classifier import ClassifierError, ImageClassifier
from bot.safety.images import blurred_png
from bot.safety.policy import (
    BLUR,
    EXEMPT,
    POSTED,
    SPOILER,
    WITHHELD,
    ImagePolicy,
    Verdict,
    action_for,
    judge,
    may_reveal,
    policy_for,
)
from bot.safety.settings import SafetySettings
from bot_harness import bot_config, png
from db.community_values import ServerPolicy
from engine.config.settings import ConfigError
from test_bot_hostile import IMAGES
from tiny_classifier import save_tiny_classifier

POLICY = ImagePolicy("blur", ("nsfw",), 0.5, False, 3, None)


@pytest.fixture(scope="module")
def mid_classifier(tmp_path_factory) -> ImageClassifier:
    return ImageClassifier.load(str(save_tiny_classifier(tmp_path_factory.mktemp("mid"), nsfw_score=0.7)))


def test_the_worst_image_of_a_job_decides_and_an_unreadable_one_is_flagged():
    clean, racy = {"normal": 0.9, "nsfw": 0.1}, {"normal": 0.2, "nsfw": 0.8}
    assert judge([clean, clean], POLICY) == Verdict(False, "nsfw", 0.1)
    assert judge([clean, racy], POLICY) == Verdict(True, "nsfw", 0.8)
    assert judge([clean, racy], replace(POLICY, threshold=0.81)).flagged is False
    assert judge([clean, None], POLICY) == Verdict(True, "unclassified", None)
    assert judge([{"sfw": 1.0}], POLICY) == Verdict(False, None, None)  # none of the policy's labels


@pytest.mark.parametrize(
    ("mode", "age_restricted", "expected"),
    [
        ("off", False, POSTED),
        ("spoiler", False, SPOILER),
        ("blur", False, BLUR),
        ("withhold", False, WITHHELD),
        ("withhold", True, EXEMPT),
        ("blur", True, EXEMPT),
    ],
)
def test_a_flagged_result_becomes_what_the_mode_says_outside_age_restricted_channels(mode, age_restricted, expected):
    flagged = Verdict(True, "nsfw", 0.9)
    policy = replace(POLICY, mode=mode)
    assert action_for(flagged, policy, age_restricted=age_restricted) == expected
    assert action_for(Verdict(False, "nsfw", 0.1), policy, age_restricted=age_restricted) == POSTED


def test_an_unreadable_result_is_withheld_whatever_the_mode_but_off():
    unreadable = Verdict(True, "unclassified", None)
    for mode in ("spoiler", "blur", "withhold"):
        assert action_for(unreadable, replace(POLICY, mode=mode), age_restricted=False) == WITHHELD
    assert action_for(unreadable, replace(POLICY, mode="off"), age_restricted=False) == POSTED


def test_a_servers_choices_override_the_configuration_and_no_classifier_means_off():
    settings = SafetySettings(classifier="owner/model", mode="spoiler", threshold=0.6)
    assert policy_for(None, settings) == ImagePolicy("spoiler", ("nsfw", "porn", "hentai", "sexy"), 0.6, False, 3, None)
    server = ServerPolicy(safety_mode="withhold", safety_labels=("NSFW",), safety_threshold=0.8, strikes=2)
    assert policy_for(server, settings) == ImagePolicy("withhold", ("nsfw",), 0.8, False, 3, 2)
    assert policy_for(server, SafetySettings()).mode == "off"


def test_reveal_only_in_age_restricted_channels_or_by_dm_where_allowed():
    assert may_reveal(POLICY, age_restricted=True, requester_in_dm=False)
    assert not may_reveal(POLICY, age_restricted=False, requester_in_dm=True)
    assert may_reveal(replace(POLICY, reveal_in_dm=True), age_restricted=False, requester_in_dm=True)
    assert not may_reveal(replace(POLICY, reveal_in_dm=True), age_restricted=False, requester_in_dm=False)


def test_the_blurred_copy_keeps_the_size_and_loses_the_detail():
    from PIL import Image

    stripes = Image.new("RGB", (96, 64), "white")
    for x in range(0, 96, 4):
        stripes.paste((0, 0, 0), (x, 0, x + 2, 64))
    out = io.BytesIO()
    stripes.save(out, "PNG")
    blurred = Image.open(io.BytesIO(blurred_png(out.getvalue())))
    assert blurred.size == (96, 64)
    values = [v for v in blurred.convert("L").getdata()]
    assert max(values) - min(values) < 40  # the stripes are gone


def test_the_classifier_scores_each_image_and_an_undecodable_one_gets_none(mid_classifier, caplog):
    caplog.set_level(logging.WARNING)
    scores = mid_classifier.classify([png((64, 64)), b"not an image", png((30, 90), mode="RGBA")])
    assert scores[1] is None and len(caplog.records) == 1
    for score in (scores[0], scores[2]):
        assert score["nsfw"] == pytest.approx(0.7, abs=1e-4) and score["normal"] == pytest.approx(0.3, abs=1e-4)


def test_the_hostile_upload_corpus_goes_through_the_classifier_without_a_crash(mid_classifier):
    limit_pillow()
    accepted = []
    for data in IMAGES:
        try:
            accepted.append(load_init_image(data, size=None, max_width=128, max_height=128, target_area=64 * 64).png)
        except BadInput:
            pass
    assert len(accepted) >= 5
    assert all(score is not None for score in mid_classifier.classify(accepted))  # what admission hands it
    raw = mid_classifier.classify(IMAGES)  # and the raw bytes too: scores or None, never an exception
    truncated = next(i for i, data in enumerate(IMAGES) if len(data) == 60)
    assert len(raw) == len(IMAGES) and raw[truncated] is None


def test_a_missing_or_broken_classifier_is_one_clear_error(tmp_path):
    with pytest.raises(ClassifierError, match="no such folder, and not a Hugging Face Hub id"):
        ImageClassifier.load(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ClassifierError, match=r"could not load an image classifier .*save_pretrained"):
        ImageClassifier.load(str(tmp_path / "broken"))


def test_the_start_stops_with_one_line_naming_a_missing_classifier(tmp_path, capsys):
    from bot.__main__ import run

    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", 1)
    config = replace(config, safety=SafetySettings(classifier=str(tmp_path / "nsfw-model")))
    assert asyncio.run(run(config, engine=False)) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: safety.classifier = ") and "nsfw-model" in err


def test_safety_in_config_toml(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[model]\nsource = "x"\n[safety]\nclassifier = "owner/nsfw-vit"\nmode = "withhold"\n')
    safety = load_config(path, {"DISCORD_TOKEN": "t"}).safety
    assert (safety.classifier, safety.mode, safety.threshold) == ("owner/nsfw-vit", "withhold", 0.5)
    assert safety.enabled
    path.write_text('[model]\nsource = "x"\n[safety]\nmode = "hide"\n')
    with pytest.raises(ConfigError, match="safety.mode"):
        load_config(path, {"DISCORD_TOKEN": "t"})


def test_nudenet_named_but_not_installed_is_one_clear_error(tmp_path):
    pytest.importorskip("bot.safety.nudenet")
    try:
        import nudenet  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the nudenet extra is installed here")
    from bot.wiring import load_safety

    config = replace(bot_config("unused", "sqlite://", 1), safety=SafetySettings(classifier="nudenet"))
    with pytest.raises(ClassifierError, match=r"NudeNet is not installed .*\[nudenet\].*AGPL-3.0"):
        load_safety(config)
