"""Checks for what members type and upload, done once at the Discord boundary.

Everything here is pure and synchronous, so it can be tested (and fuzzed) without Discord.
A refusal is a :class:`BadInput` whose message is shown to the member as it is: it says what
was wrong and what is allowed. Inner code (queue, engine) trusts what comes out of here.
"""

from __future__ import annotations

import io
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from discord import app_commands
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import GenerationError
from engine.prompt_syntax import (
    CHUNK_LENGTH,
    PromptSyntaxError,
    chunks_needed,
    count_tokens,
    find_lora,
    lora_key,
    parse_lora_key,
    parse_prompt_attention,
    strip_lora_tags,
)

log = logging.getLogger(__name__)

#: Hosts attachments are downloaded from; anything else is refused (no fetching of arbitrary URLs).
DISCORD_CDN_HOSTS: frozenset[str] = frozenset({"cdn.discordapp.com", "media.discordapp.net"})

#: The largest decoded upload we accept: a 24-megapixel phone photo (about 100 MB as RGBA).
#: Pillow's own bomb limit is set to this too (see :func:`limit_pillow`).
MAX_INPUT_PIXELS = 6000 * 4000

#: CLIP sees 77 tokens: the start and end tokens plus 75 of the prompt.
CLIP_PROMPT_TOKENS = 75

#: Longer prompts are refused. The engine reads a prompt in chunks of 75 tokens; each chunk is
#: one more text-encoder pass and 77 more cross-attention tokens for every row of the batch the
#: job shares (shorter rows are padded to the longest). 1000 characters of English are about
#: 250 tokens (4 chunks); the same length in emoji or CJK can be 2000 tokens or more.
MAX_PROMPT_CHUNKS = 8

# Characters kept although they are "control" or "format": plain whitespace becomes a space.
_WHITESPACE = {"\t", "\n", "\r", "\x0b", "\x0c"}
# Blank characters outside those categories: Hangul fillers, the braille blank, the combining
# grapheme joiner. Names and messages that "look empty" are made of these.
_INVISIBLE = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800", "\u034f"}


class BadInput(app_commands.AppCommandError):
    """A value a member gave is not allowed; the message says what is."""


def limit_pillow(max_pixels: int = MAX_INPUT_PIXELS) -> None:
    """Make Pillow refuse decompression bombs above what the bot needs (called at start-up)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def clean_text(text: str) -> str:
    """Drop control, bidi, zero-width and other invisible characters; squeeze spaces.

    Unicode categories Cc (controls), Cf (format: bidi overrides, zero-width joiners, BOM, soft
    hyphen), Cs (lone surrogates) and Co (private use) can hide text from the people reading the
    prompt back, or confuse the tokenizer; none of them means anything to the model. The same goes
    for the blank "letters" (:data:`_INVISIBLE`) used to make text that looks empty.
    Characters are dropped before the NFC normalisation, so that cleaning twice changes nothing.
    """
    out = []
    for ch in text:
        if ch in _WHITESPACE:
            out.append(" ")
        elif ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            continue
        else:
            out.append(ch)
    return " ".join(unicodedata.normalize("NFC", "".join(out)).split())


def check_prompt(text: str | None, *, max_chars: int, name: str = "prompt", required: bool = True) -> str:
    """The cleaned prompt, or BadInput when it is empty (and required) or too long."""
    cleaned = clean_text(text or "")
    if required and not cleaned:
        raise BadInput(f"The {name} is empty (after removing invisible characters). Describe the image you want.")
    if len(cleaned) > max_chars:
        raise BadInput(f"The {name} is {len(cleaned)} characters long; the limit is {max_chars}.")
    return cleaned


def check_prompt_tokens(prompt: str, negative: str = "") -> str | None:
    """Refuse prompts over :data:`MAX_PROMPT_CHUNKS` chunks; otherwise a notice, for a prompt
    (or negative prompt) longer than CLIP's 75 tokens, saying how many chunks it takes; None
    when both fit in one.

    The engine reads long prompts in chunks of 75 tokens (engine/families/sd/prompts.py), nothing is cut.
    Counted with the CLIP vocabulary every model family shares (textual-inversion embeddings
    are counted by their name's tokens, so the count can be a little off for them). The first
    call builds the tokenizer (about a second): call it from a thread.
    """
    notes = []
    for name, text in (("prompt", prompt), ("negative prompt", negative)):
        if not text:
            continue
        try:
            tokens = count_tokens(text)
        except PromptSyntaxError as e:  # (a:1.2.3): say what to write instead
            raise BadInput(f"In the {name}: {e}") from None
        chunks = chunks_needed(tokens)
        if chunks > MAX_PROMPT_CHUNKS:
            raise BadInput(
                f"The {name} is {tokens} tokens long ({chunks} chunks of {CHUNK_LENGTH}); the limit is "
                f"{MAX_PROMPT_CHUNKS} chunks ({MAX_PROMPT_CHUNKS * CHUNK_LENGTH} tokens). Emoji and "
                "unusual characters take several tokens each."
            )
        if chunks > 1:
            notes.append(f"the {name} is {tokens} tokens, read in {chunks} chunks of {CHUNK_LENGTH}")
    if not notes:
        return None
    return f"Note: {' and '.join(notes)} (CLIP reads {CHUNK_LENGTH} at a time; nothing is cut off)."


def check_loras(prompt: str, lora_dir: str) -> None:
    """Refuse now what the engine would fail the job for: a malformed ``<lora:NAME:WEIGHT>`` tag,
    or a NAME with no file in the model's LoRA folder (``lora_dir``), with what there is. When the
    folder is configured but not on this machine (GPU workers elsewhere), only they can tell."""
    key = lora_key(prompt)
    if not key:
        return
    folder = Path(lora_dir).expanduser() if lora_dir else None
    try:
        uses = parse_lora_key(key)
        if folder is None or folder.is_dir():
            for use in uses:
                find_lora(folder, use.name)
    except GenerationError as e:
        raise BadInput(str(e)) from None


def check_prompt_text(prompt: str, negative: str, lora_dir: str) -> str | None:
    """:func:`check_loras` and :func:`check_prompt_tokens` (its note) together: one thread hop."""
    check_loras(prompt, lora_dir)
    return check_prompt_tokens(prompt, negative)


def flow_prompt_note(prompt: str, label: str) -> str | None:
    """For an SD 3.5 or Flux.1 model, whose CLIP and T5 read the prompt as written: a note when it
    uses AUTOMATIC1111's emphasis or ``BREAK``, which those models do not apply (said, not refused)."""
    text = strip_lora_tags(prompt)
    if "BREAK" in text.split() or any(weight != 1.0 for _, weight in parse_prompt_attention(text)):
        return f"{label} models read the prompt as written: A1111's (emphasis:1.2) and BREAK do not apply to them."
    return None


def warm_up_token_counter() -> None:
    """Build the tokenizer :func:`check_prompt_tokens` counts with (about a second, and torch's
    import if not done yet), so that no member's command waits on it."""
    count_tokens("warm up")


def clip_truncation_notice(tokenizer, prompt: str) -> str | None:
    """The notice of :func:`check_prompt_tokens` for ``prompt`` alone, never a refusal.

    Kept for ``SDBot.truncation_note``; ``tokenizer`` is not needed any more (every family
    shares CLIP's vocabulary). The commands use :func:`check_prompt_tokens`.
    """
    try:
        return check_prompt_tokens(prompt)
    except BadInput:  # the commands refuse such prompts before anything is queued
        return None


def check_attachment_meta(
    *,
    filename: str,
    content_type: str | None,
    size: int,
    url: str,
    allowed_types: tuple[str, ...],
    max_bytes: int,
    allowed_hosts: frozenset[str],
) -> None:
    """Checks made before anything is downloaded: type, declared size, and where it lives."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    names = ", ".join(t.removeprefix("image/").upper() for t in allowed_types)
    shown = _shown_name(filename)
    if kind not in allowed_types:
        raise BadInput(f"`{shown}` is {_shown_name(kind) or 'of unknown type'}; send a {names} image.")
    if size > max_bytes:
        raise BadInput(f"`{shown}` is {size / 1048576:.1f} MiB; the limit is {max_bytes / 1048576:.1f} MiB.")
    parts = urlsplit(url)
    if (
        parts.scheme not in ("https", "http")
        or parts.username is not None
        or parts.password is not None
        or (parts.hostname or "").lower() not in allowed_hosts
    ):
        raise BadInput("Attachments are only accepted from Discord's own servers; upload the image to Discord.")


def _shown_name(name: str, limit: int = 60) -> str:
    """A file name or type safe to echo inside `code`: visible characters, no backticks, short."""
    name = clean_text(name).replace("`", "'")
    return name if len(name) <= limit else name[: limit - 1] + "…"


#: Pillow's name for each upload type: only these decoders ever see an upload's bytes, whatever
#: the file really is (a TIFF or PSD sent as image/png is refused, not decoded).
PILLOW_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}


@dataclass(frozen=True)
class InitImage:
    """An upload ready for img2img: RGB PNG bytes at a size the engine accepts."""

    png: bytes
    width: int
    height: int


def fit_size(
    width: int, height: int, *, max_width: int, max_height: int, target_area: int, multiple: int = 8
) -> tuple[int, int]:
    """Scale (width, height) keeping its shape: within the maxima, about ``target_area`` pixels
    at most, in multiples of ``multiple`` (the model's grid: 8, or 16 for SD 3.5 and Flux) and at
    least 64 on each side."""
    scale = min(1.0, max_width / width, max_height / height, (target_area / (width * height)) ** 0.5)
    w = max(64, int(width * scale) // multiple * multiple)
    h = max(64, int(height * scale) // multiple * multiple)
    return min(w, max_width // multiple * multiple), min(h, max_height // multiple * multiple)


def load_init_image(
    data: bytes,
    *,
    size: tuple[int, int] | None,
    max_width: int,
    max_height: int,
    target_area: int,
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP"),
    multiple: int = 8,
) -> InitImage:
    """Decode an upload safely and normalise it to an RGB image the engine can use.

    Refuses non-images, corrupt or truncated files, decompression bombs and files in other
    ``formats`` than the allowed ones (Pillow names). Animated images use their first frame;
    EXIF rotation is applied; CMYK, palette, alpha and 16-bit images become 8-bit RGB (alpha over
    white). ``size`` forces the output size (cropped to fill it); otherwise the image's own shape
    is kept, scaled by :func:`fit_size` to the model's grid (``multiple``).
    """
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))  # reads the header only
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise BadInput(
                f"The image is {image.width}x{image.height}; images up to "
                f"{MAX_INPUT_PIXELS // 1_000_000} megapixels are accepted."
            )
        image.seek(0)  # first frame of an animation
        # A big JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still covers the largest
        # size we make (either way round, as EXIF may rotate it): faster, and less memory.
        largest = max(max_width, max_height, *(size or ()))
        image.draft(image.mode if image.mode in ("RGB", "L", "CMYK") else None, (largest, largest))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    except BadInput:
        raise
    except Image.DecompressionBombError:
        raise BadInput(
            f"The image is too large; images up to {MAX_INPUT_PIXELS // 1_000_000} megapixels are accepted."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise _unreadable(e) from None
    except Exception as e:
        log.warning("upload refused: the decoder failed unexpectedly", exc_info=True)
        raise _unreadable(e) from None
    if size is None:
        size = fit_size(
            image.width,
            image.height,
            max_width=max_width,
            max_height=max_height,
            target_area=target_area,
            multiple=multiple,
        )
        image = image.resize(size, Image.Resampling.LANCZOS)
    else:
        image = ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return InitImage(png=out.getvalue(), width=image.width, height=image.height)


def _unreadable(error: Exception) -> BadInput:
    return BadInput(
        f"That file could not be read as an image ({type(error).__name__}); "
        "it may be corrupt or truncated. Send a PNG, JPEG or WebP image."
    )


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


def enlarged_size(
    png: bytes, *, factor: float, max_width: int, max_height: int, multiple: int = 8
) -> tuple[int, int] | None:
    """The image's size scaled by ``factor``, capped by the size limits, in multiples of
    ``multiple`` (the model's grid); None when it cannot grow at all (it is already at the largest
    size). Reads only the header."""
    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    scale = min(factor, max_width / width, max_height / height)
    w, h = int(width * scale) // multiple * multiple, int(height * scale) // multiple * multiple
    if w <= width and h <= height:
        return None
    return w, h
