"""Checks for what members type and upload, done once at the Discord boundary.

Everything here is pure and synchronous, so it can be tested (and fuzzed) without Discord.
A refusal is a :class:`BadInput` whose message is shown to the member as it is: it says what
was wrong and what is allowed. Inner code (queue, engine) trusts what comes out of here.
"""

from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from discord import app_commands
from PIL import Image, ImageOps, UnidentifiedImageError

#: Hosts attachments are downloaded from; anything else is refused (no fetching of arbitrary URLs).
DISCORD_CDN_HOSTS: frozenset[str] = frozenset({"cdn.discordapp.com", "media.discordapp.net"})

#: The largest decoded upload we accept: a 24-megapixel phone photo (about 100 MB as RGBA).
#: Pillow's own bomb limit is set to this too (see :func:`limit_pillow`).
MAX_INPUT_PIXELS = 6000 * 4000

#: CLIP sees 77 tokens: the start and end tokens plus 75 of the prompt.
CLIP_PROMPT_TOKENS = 75

# Characters kept although they are "control" or "format": plain whitespace becomes a space.
_WHITESPACE = {"\t", "\n", "\r", "\x0b", "\x0c"}


class BadInput(app_commands.AppCommandError):
    """A value a member gave is not allowed; the message says what is."""


def limit_pillow(max_pixels: int = MAX_INPUT_PIXELS) -> None:
    """Make Pillow refuse decompression bombs above what the bot needs (called at start-up)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def clean_text(text: str) -> str:
    """Drop control, bidi, zero-width and other invisible format characters; squeeze spaces.

    Unicode categories Cc (controls), Cf (format: bidi overrides, zero-width joiners, BOM, soft
    hyphen), Cs (lone surrogates) and Co (private use) can hide text from the people reading the
    prompt back, or confuse the tokenizer; none of them means anything to the model.
    """
    text = unicodedata.normalize("NFC", text)
    out = []
    for ch in text:
        if ch in _WHITESPACE:
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            continue
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def check_prompt(text: str | None, *, max_chars: int, name: str = "prompt", required: bool = True) -> str:
    """The cleaned prompt, or BadInput when it is empty (and required) or too long."""
    cleaned = clean_text(text or "")
    if required and not cleaned:
        raise BadInput(f"The {name} is empty (after removing invisible characters). Describe the image you want.")
    if len(cleaned) > max_chars:
        raise BadInput(f"The {name} is {len(cleaned)} characters long; the limit is {max_chars}.")
    return cleaned


def clip_truncation_notice(tokenizer, prompt: str) -> str | None:
    """A short notice when CLIP will ignore the end of ``prompt``, or None.

    ``tokenizer`` is a transformers CLIP tokenizer (or None when none is available).
    """
    if tokenizer is None or not prompt:
        return None
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
    if len(ids) <= CLIP_PROMPT_TOKENS:
        return None
    dropped = tokenizer.decode(ids[CLIP_PROMPT_TOKENS:CLIP_PROMPT_TOKENS + 8]).strip()
    return (f"Note: the prompt is {len(ids)} tokens and the model reads only {CLIP_PROMPT_TOKENS}; "
            f"everything from “{dropped}…” on is ignored.")


def check_attachment_meta(*, filename: str, content_type: str | None, size: int, url: str,
                          allowed_types: tuple[str, ...], max_bytes: int,
                          allowed_hosts: frozenset[str]) -> None:
    """Checks made before anything is downloaded: type, declared size, and where it lives."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    names = ", ".join(t.removeprefix("image/").upper() for t in allowed_types)
    if kind not in allowed_types:
        raise BadInput(f"`{filename}` is {kind or 'of unknown type'}; send a {names} image.")
    if size > max_bytes:
        raise BadInput(f"`{filename}` is {size / 1048576:.1f} MiB; the limit is {max_bytes / 1048576:.1f} MiB.")
    host = (urlsplit(url).hostname or "").lower()
    if host not in allowed_hosts:
        raise BadInput("Attachments are only accepted from Discord's own servers; upload the image to Discord.")


@dataclass(frozen=True)
class InitImage:
    """An upload ready for img2img: RGB PNG bytes at a size the engine accepts."""

    png: bytes
    width: int
    height: int


def fit_size(width: int, height: int, *, max_width: int, max_height: int, target_area: int) -> tuple[int, int]:
    """Scale (width, height) keeping its shape: within the maxima, about ``target_area`` pixels
    at most, in multiples of 8 and at least 64 on each side."""
    scale = min(1.0, max_width / width, max_height / height, (target_area / (width * height)) ** 0.5)
    w = max(64, int(width * scale) // 8 * 8)
    h = max(64, int(height * scale) // 8 * 8)
    return min(w, max_width // 8 * 8), min(h, max_height // 8 * 8)


def load_init_image(data: bytes, *, size: tuple[int, int] | None, max_width: int, max_height: int,
                    target_area: int) -> InitImage:
    """Decode an upload safely and normalise it to an RGB image the engine can use.

    Refuses non-images, corrupt or truncated files and decompression bombs. Animated images use
    their first frame; EXIF rotation is applied; CMYK, palette, alpha and 16-bit images become
    8-bit RGB (alpha over white). ``size`` forces the output size (cropped to fill it);
    otherwise the image's own shape is kept, scaled by :func:`fit_size`.
    """
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise BadInput(f"The image is {image.width}x{image.height}; images up to "
                           f"{MAX_INPUT_PIXELS // 1_000_000} megapixels are accepted.")
        image.seek(0)  # first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    except BadInput:
        raise
    except Image.DecompressionBombError:
        raise BadInput(f"The image is too large; images up to {MAX_INPUT_PIXELS // 1_000_000} "
                       "megapixels are accepted.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInput(f"That file could not be read as an image ({type(e).__name__}); "
                       "it may be corrupt or truncated. Send a PNG, JPEG or WebP image.") from None
    if size is None:
        size = fit_size(image.width, image.height, max_width=max_width, max_height=max_height,
                        target_area=target_area)
        image = image.resize(size, Image.Resampling.LANCZOS)
    else:
        image = ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return InitImage(png=out.getvalue(), width=image.width, height=image.height)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow opens; transparency is composited over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("LA", "PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def enlarge(png: bytes, *, factor: float, max_width: int, max_height: int) -> InitImage | None:
    """The image scaled by ``factor`` (Lanczos), capped by the size limits; None when it cannot
    grow at all (it is already at the largest size)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = min(factor, max_width / image.width, max_height / image.height)
    w = int(image.width * scale) // 8 * 8
    h = int(image.height * scale) // 8 * 8
    if w <= image.width and h <= image.height:
        return None
    image = image.resize((w, h), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return InitImage(png=out.getvalue(), width=w, height=h)
