"""The checks at the Discord boundary, without Discord: prompts, uploads, option values."""

from __future__ import annotations

import asyncio
import io
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.commands import Bounded, OneOf, Text, generation_fields
from bot.inputs import BadInput, check_prompt, clean_text, enlarge, fit_size, load_init_image
from bot_harness import png
from engine.settings import GenerationSettings

GEN = GenerationSettings()


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@given(st.text())
def test_clean_text_leaves_no_invisible_characters(text):
    cleaned = clean_text(text)
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") for c in cleaned)
    assert cleaned == cleaned.strip() and "  " not in cleaned
    assert clean_text(cleaned) == cleaned


def test_clean_text_examples():
    assert clean_text("a\u202ecat\u200b\u2066 in\tspace\x00") == "acat in space"
    assert clean_text("caf\u0065\u0301") == "café"


def test_prompt_limits():
    with pytest.raises(BadInput, match="empty"):
        check_prompt("\u200b \u200d", max_chars=10)
    with pytest.raises(BadInput, match="limit is 10"):
        check_prompt("x" * 11, max_chars=10)
    assert check_prompt("", max_chars=10, required=False) == ""


def run(coro):
    return asyncio.run(coro)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.just(10**400), st.floats(allow_nan=True), st.text(), st.none(), st.booleans()))
def test_number_options_accept_only_their_range(value):
    for option in (Bounded("steps", int, 1, 50), Bounded("guidance", float, 0, 20)):
        try:
            out = run(option.transform(None, value))
        except BadInput as e:
            assert f"`{option.name}`" in str(e)
        else:
            assert option.low <= out <= option.high and isinstance(out, option.kind)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_choice_and_text_options(value):
    size = OneOf("size", {"512x512": "512x512"})
    try:
        assert run(size.transform(None, value)) == "512x512"
    except BadInput as e:
        assert "512x512" in str(e)
    try:
        out = run(Text("prompt", 20, True).transform(None, value))
    except BadInput:
        assert not clean_text(value) or len(clean_text(value)) > 20
    else:
        assert out == clean_text(value) and 0 < len(out) <= 20


def test_generation_fields_fill_defaults_and_draw_a_seed():
    fields = generation_fields(GEN, prompt="p", negative="", seed=None, steps=None, guidance=None, size=None,
                               sampler=None, count=1)
    assert (fields["width"], fields["height"], fields["steps"]) == (512, 512, GEN.default_steps)
    assert 0 <= fields["seed"] < 2**32
    fields = generation_fields(GEN, prompt="p", negative="n", seed=0, steps=3, guidance=0.0, size="768x512",
                               sampler="ddim", count=2)
    assert (fields["seed"], fields["guidance"], fields["width"], fields["height"]) == (0, 0.0, 768, 512)


def load(data: bytes, size=None):
    return load_init_image(data, size=size, max_width=1024, max_height=1024, target_area=512 * 512)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (200, 100), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° when shown
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    init = load(out.getvalue())
    assert init.width < init.height


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    init = load(out.getvalue())
    r, g, b = decode(init.png).getpixel((10, 10))
    assert r > 200 and b < 50


@pytest.mark.parametrize("mode, color", [("CMYK", (0, 0, 0, 0)), ("LA", (100, 0)), ("I;16", 65535),
                                         ("P", 5), ("RGBA", (0, 0, 0, 0)), ("1", 1)])
def test_every_mode_becomes_rgb(mode, color):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    init = load(png((64, 64), color=color, mode=mode, fmt=fmt))
    image = decode(init.png)
    assert image.mode == "RGB" and image.size == (64, 64)
    if mode in ("RGBA", "LA", "I;16", "1"):
        assert image.getpixel((0, 0))[0] > 240  # transparent -> white; 16-bit full scale -> white


@pytest.mark.parametrize("data", [b"", b"GIF89a", png()[:60], b"\xff\xd8\xff" + b"\0" * 50, png((7000, 7000), mode="1")])
def test_broken_or_huge_images_are_refused(data):
    with pytest.raises(BadInput):
        load(data)


def test_sizes_fit_the_limits():
    assert fit_size(4000, 3000, max_width=1024, max_height=1024, target_area=512 * 512) == (584, 440)
    assert fit_size(64, 64, max_width=1024, max_height=1024, target_area=512 * 512) == (64, 64)
    init = load(png((300, 200)), size=(512, 512))
    assert (init.width, init.height) == (512, 512)
    assert enlarge(png((64, 64)), factor=2, max_width=96, max_height=1024).width == 96
    assert enlarge(png((96, 96)), factor=2, max_width=96, max_height=96) is None


def test_clip_truncation_notice():
    from bot.inputs import clip_truncation_notice
    from engine.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    assert clip_truncation_notice(tokenizer, "a photo of a cat") is None
    notice = clip_truncation_notice(tokenizer, " ".join(f"word{i}" for i in range(80)))
    assert notice is not None and "only 75" in notice
