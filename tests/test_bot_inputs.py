"""The checks at the Discord boundary, without Discord: prompts, uploads, option values."""

from __future__ import annotations

import asyncio
import io
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.inputs import BadInput, check_prompt, clean_text, enlarged_size, fit_size, load_init_image
from bot.transformers import Bounded, OneOf, Text
from bot_harness import png
from engine.config.settings import GenerationSettings

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


def test_configured_defaults_fill_what_was_left_out_and_a_seed_is_drawn():
    params = GEN.params("p", negative_prompt="")
    assert (params.width, params.height, params.steps) == (512, 512, GEN.default_steps)
    assert 0 <= params.seed < 2**32
    params = GEN.params(
        "p", negative_prompt="n", seed=0, steps=3, guidance=0.0, size=(768, 512), sampler="ddim", count=2
    )
    assert (params.seed, params.guidance, params.width, params.height) == (0, 0.0, 768, 512)


def load(data: bytes, size=None, formats=("PNG", "JPEG", "WEBP", "GIF")):
    return load_init_image(data, size=size, max_width=1024, max_height=1024, target_area=512 * 512, formats=formats)


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


@pytest.mark.parametrize(
    "mode, color",
    [("CMYK", (0, 0, 0, 0)), ("LA", (100, 0)), ("I;16", 65535), ("P", 5), ("RGBA", (0, 0, 0, 0)), ("1", 1)],
)
def test_every_mode_becomes_rgb(mode, color):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    init = load(png((64, 64), color=color, mode=mode, fmt=fmt))
    image = decode(init.png)
    assert image.mode == "RGB" and image.size == (64, 64)
    if mode in ("RGBA", "LA", "I;16", "1"):
        assert image.getpixel((0, 0))[0] > 240  # transparent -> white; 16-bit full scale -> white


@pytest.mark.parametrize(
    "data", [b"", b"GIF89a", png()[:60], b"\xff\xd8\xff" + b"\0" * 50, png((7000, 7000), mode="1")]
)
def test_broken_or_huge_images_are_refused(data):
    with pytest.raises(BadInput):
        load(data)


def test_sizes_fit_the_limits():
    assert fit_size(4000, 3000, max_width=1024, max_height=1024, target_area=512 * 512) == (584, 440)
    assert fit_size(64, 64, max_width=1024, max_height=1024, target_area=512 * 512) == (64, 64)
    init = load(png((300, 200)), size=(512, 512))
    assert (init.width, init.height) == (512, 512)
    assert enlarged_size(png((64, 64)), factor=2, max_width=96, max_height=1024) == (96, 96)
    assert enlarged_size(png((64, 48)), factor=2, max_width=1024, max_height=1024) == (128, 96)
    assert enlarged_size(png((96, 96)), factor=2, max_width=96, max_height=96) is None


def test_long_prompts_get_a_chunk_notice_and_very_long_ones_are_refused():
    from bot.inputs import MAX_PROMPT_CHUNKS, check_prompt_tokens, clip_truncation_notice

    assert check_prompt_tokens("a photo of a cat", "blurry") is None
    long = " ".join(f"word{i}" for i in range(80))  # 230 tokens
    notice = check_prompt_tokens(long)
    assert notice is not None and "4 chunks of 75" in notice and "nothing is cut off" in notice
    both = check_prompt_tokens("a cat", long)
    assert "negative prompt is" in both and "the prompt is" not in both
    with pytest.raises(BadInput, match=f"the limit is {MAX_PROMPT_CHUNKS} chunks"):
        check_prompt_tokens("\U0001f600" * 1000)  # 1000 emoji: 1000 tokens, 14 chunks
    with pytest.raises(BadInput, match="negative prompt"):
        check_prompt_tokens("a cat", "\u4e2d" * 1000)
    assert clip_truncation_notice(None, long) == notice  # the old name, for SDBot.truncation_note


def test_invisible_fillers_and_cleaning_twice():
    assert clean_text("\u3164\u115f\u2800 \u034f") == ""
    with pytest.raises(BadInput, match="empty"):
        check_prompt("\u3164\uffa0", max_chars=10)
    # A zero-width joiner between a letter and its accent: cleaned once, it stays clean.
    once = clean_text("e\u200d\u0301")
    assert once == "\u00e9" and clean_text(once) == once


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/a.png",
        "file:///etc/passwd",
        "https://user:pw@cdn.discordapp.com/a.png",
        "ftp://cdn.discordapp.com/a.png",
        "https://cdn.discordapp.com.evil.example/a.png",
        "https://evil.example@x/a.png",
    ],
)
def test_only_discord_cdn_urls(url):
    from bot.inputs import DISCORD_CDN_HOSTS, check_attachment_meta

    with pytest.raises(BadInput, match="Discord's own servers"):
        check_attachment_meta(
            filename="a.png",
            content_type="image/png",
            size=10,
            url=url,
            allowed_types=("image/png",),
            max_bytes=100,
            allowed_hosts=DISCORD_CDN_HOSTS,
        )
    check_attachment_meta(
        filename="a.png",
        content_type="image/png",
        size=10,
        url="https://cdn.discordapp.com/attachments/1/2/a.png?ex=1",
        allowed_types=("image/png",),
        max_bytes=100,
        allowed_hosts=DISCORD_CDN_HOSTS,
    )


def test_file_names_are_echoed_safely():
    from bot.inputs import check_attachment_meta

    with pytest.raises(BadInput) as refused:
        check_attachment_meta(
            filename="`@everyone`\u202e" + "x" * 200 + ".txt",
            content_type="text/plain",
            size=10,
            url="https://cdn.discordapp.com/a",
            allowed_types=("image/png",),
            max_bytes=100,
            allowed_hosts=frozenset({"cdn.discordapp.com"}),
        )
    text = str(refused.value)
    assert text.count("`") == 2 and "\u202e" not in text and len(text) < 150


def test_animated_webp_uses_its_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    r, g, b = decode(load(out.getvalue(), formats=("WEBP",)).png).getpixel((10, 10))
    assert r > 200 and b < 50


def test_only_the_allowed_decoders_see_an_upload():
    tiff = png((64, 64), fmt="TIFF")
    assert load(tiff, formats=("TIFF",)).width == 64
    with pytest.raises(BadInput, match="could not be read"):
        load(tiff, formats=("PNG", "JPEG", "WEBP"))
    with pytest.raises(BadInput):
        load(png(fmt="GIF"), formats=("PNG",))


def test_big_jpegs_are_decoded_at_a_reduced_scale():
    init = load(png((4800, 3200), fmt="JPEG"))  # decoded at 1/4 (1200x800), then fitted
    assert (init.width, init.height) == (624, 416)


@pytest.mark.parametrize(
    "data",
    [
        png((40, 40), mode="RGBA", fmt="WEBP"),
        png((40, 40), mode="LA"),
        png((40, 40), mode="I;16", color=300),
        png((40, 40), mode="L", fmt="JPEG"),
    ],
)
def test_more_modes_become_rgb(data):
    assert decode(load(data).png).mode == "RGB"


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=2000),
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8 ", b"GIF89a"]),
)
def test_random_bytes_are_refused_not_crashed_on(data, magic):
    try:
        init = load(magic + data)
    except BadInput:
        return
    assert decode(init.png).mode == "RGB"
