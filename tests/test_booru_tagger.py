"""/describe's WD14 booru tagger: the reference's preprocessing, its thresholds and categories, a
tiny WD14-shaped ONNX tagger (tests/tiny_tagger.py) run by onnxruntime, and how /describe mixes
its tags with the captioner's sentences."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.config.describe_settings import parse_describe
from engine.config.toml_config import ConfigError
from engine.errors import GenerationError
from engine.features.booru_tagger import (
    CHARACTER,
    GENERAL,
    RATING,
    BooruTagger,
    Label,
    prepare_image,
    prompt_tags,
    tag_text,
)
from engine.features.describe import PROMPTS, Describer, mixed
from tiny_captioner import save_tiny_captioner
from tiny_tagger import PROMPT_TAGS as TAGS
from tiny_tagger import save_tiny_tagger


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return save_tiny_tagger(tmp_path_factory.mktemp("tagger"))


def reference_input(image: Image.Image, size: int) -> np.ndarray:
    """The steps as the reference writes them, with numpy doing what it can: alpha over white,
    centred on a white square, bicubic resize, BGR, float32 NHWC."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[:, :, 3:] / 255
    rgb = np.round(rgba[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    h, w = rgb.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.pad(rgb, ((top, side - h - top), (left, side - w - left), (0, 0)), constant_values=255)
    resized = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC))
    return resized[None, :, :, ::-1].astype(np.float32)


def test_the_input_is_the_references_on_white_padded_square_resized_bgr():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (40, 70, 4), dtype=np.uint8)
    pixels[:10, :, 3] = 0  # a transparent band: white in the input
    image = Image.fromarray(pixels, "RGBA")
    got = prepare_image(image, 448)
    assert got.shape == (1, 448, 448, 3) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, reference_input(image, 448), atol=1.0)  # alpha's rounding, at most 1
    assert (got[0, :150] == 255).all() and (got[0, -90:] == 255).all()  # padding (and the clear band above)


def test_the_input_is_bgr_float_0_255_and_not_resized_at_the_models_size():
    image = Image.new("RGB", (32, 16), (255, 0, 0))  # red, short: padded 8 rows above and below
    got = prepare_image(image, 32)[0]
    np.testing.assert_array_equal(got, reference_input(image, 32)[0])
    assert got[16, 16].tolist() == [0.0, 0.0, 255.0]  # blue, green, red
    assert (got[:8] == 255).all() and (got[-8:] == 255).all()


def test_thresholds_categories_order_and_the_ratings_left_out():
    labels = [
        Label("general", RATING),
        Label("solo", GENERAL),
        Label("smile", GENERAL),
        Label("hat", GENERAL),
        Label("saber", CHARACTER),
        Label("rin", CHARACTER),
        Label("artist name", 5),  # a category the reference does not use
    ]
    scores = np.array([0.99, 0.6, 0.9, 0.35, 0.86, 0.85, 0.99], dtype=np.float32)
    # Over the threshold, not at it; characters first, then general, each by score.
    assert prompt_tags(labels, scores) == ["saber", "smile", "solo"]
    assert prompt_tags(labels, scores, general=0.3, character=0.8) == ["saber", "rin", "smile", "solo", "hat"]


def test_tags_as_prompts_write_them():
    assert tag_text("long_hair") == "long hair"
    assert tag_text("^_^") == "^_^" and tag_text("(o)_(o)") == "\\(o\\)_\\(o\\)"  # kaomoji keep their underscores
    assert tag_text("hatsune_miku_(vocaloid)") == "hatsune miku \\(vocaloid\\)"  # text, not emphasis


def test_the_tiny_tagger_through_onnxruntime(tagger):
    loaded = BooruTagger.load(str(tagger))
    assert loaded.size == 448 and len(loaded.labels) == 20
    for image in (Image.new("RGB", (300, 200), "red"), Image.new("RGBA", (40, 90), (0, 0, 0, 0))):
        scores = loaded.scores(image)
        assert scores.shape == (20,) and ((scores > 0) & (scores < 1)).all()
        assert prompt_tags(loaded.labels, scores) == TAGS


def test_the_input_size_is_the_models(tmp_path):
    assert BooruTagger.load(str(save_tiny_tagger(tmp_path, size=64))).size == 64


def test_a_broken_tagger_is_one_line_naming_the_setting(tmp_path, tagger, monkeypatch):
    folder = save_tiny_tagger(tmp_path / "short")
    lines = (folder / "selected_tags.csv").read_text().splitlines()
    (folder / "selected_tags.csv").write_text("\n".join(lines[:-1]))
    with pytest.raises(GenerationError, match=r"describe.tagger = .* 20 outputs but selected_tags.csv 19 tags"):
        BooruTagger.load(str(folder))
    (folder / "model.onnx").unlink()
    with pytest.raises(GenerationError, match=r"describe.tagger = .*the folder has no model.onnx"):
        BooruTagger.load(str(folder))
    (folder / "model.onnx").write_bytes(b"not onnx")
    (folder / "selected_tags.csv").write_text((tagger / "selected_tags.csv").read_text())
    with pytest.raises(GenerationError, match=r"describe.tagger = .* could not be loaded"):
        BooruTagger.load(str(folder))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1: the cache alone
    with pytest.raises(GenerationError, match=r"could not fetch model.onnx .* set describe.tagger to their folder"):
        BooruTagger.load("sdbot-tests/no-such-tagger")


def test_the_setting_is_a_taggers_folder_or_a_hub_id(tmp_path, tagger):
    assert parse_describe({"describe": {"tagger": str(tagger)}}).offered
    assert parse_describe({"describe": {"tagger": "SmilingWolf/wd-swinv2-tagger-v3"}}).tagger
    assert not parse_describe({}).offered
    for wrong in (tmp_path, tmp_path / "missing"):  # a folder without the files, no folder
        with pytest.raises(ConfigError, match="describe.tagger"):
            parse_describe({"describe": {"tagger": str(wrong)}})


def test_mixing_sentences_and_tags():
    sets = [["a", "b"], ["a"], ["a", "b", "c"], ["a"]]
    assert mixed(["one", "two", "three"], sets) == ["one, a, b", "two, a, b", "three, a, b", "a, b"]
    assert mixed([], sets) == ["a, b", "a", "a, b, c"]  # repeats dropped
    assert mixed(["one", "two"], [[], [], ["a"], []]) == ["one", "two"]  # none at 0.35: the sentences alone
    assert mixed(["1", "2", "3", "4"], []) == ["1", "2", "3", "4"]


def test_describe_with_the_tagger_alone_gives_its_tags_at_four_thresholds(tagger):
    prompts = Describer(tagger=str(tagger)).prompts(Image.new("RGB", (64, 48), "blue"), 1)
    assert (
        prompts
        == [
            ", ".join(TAGS),  # the reference's 0.35
            ", ".join(TAGS[:5]),  # 0.5: surer
            ", ".join([*TAGS, "hat"]),  # 0.25: more
            ", ".join(TAGS[:4]),  # 0.65: the surest
        ]
    )


def test_describe_with_both_appends_the_tags_to_three_sentences_then_gives_them_alone(tagger, tmp_path):
    describer = Describer(str(save_tiny_captioner(tmp_path / "captioner")), tagger=str(tagger))
    prompts = describer.prompts(Image.new("RGB", (48, 40), "red"), 7)
    tags = ", ".join(TAGS)
    assert len(prompts) == PROMPTS and prompts[-1] == tags
    assert all(p.endswith(", " + tags) and len(p) > len(tags) + 2 for p in prompts[:-1])
    assert len(set(prompts)) == PROMPTS
