"""What a prompt says, read without a model: emphasis, ``BREAK``, LoRA tags and token counts.

Torch-free on purpose: the bot checks prompts at the Discord boundary with this module alone,
so a bot without an engine (``--no-engine``) never imports torch or diffusers. The engine reads
the same functions (:mod:`engine.families.sd.prompts` encodes, :mod:`engine.features.lora` applies), so a prompt the
bot accepts is one the engine reads the same way.

1. :func:`parse_prompt_attention` splits a prompt into ``(text, weight)`` segments with the
   same results as AUTOMATIC1111's function of that name: ``(word)`` x1.1, ``((word))`` x1.21,
   ``[word]`` /1.1, ``(word:1.3)``, escapes ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``, and ``BREAK``.
   Where A1111 fails with a bare ``ValueError`` (``(word:1.2.3)``), we raise
   :class:`PromptSyntaxError`, whose message says what to write instead.
2. :func:`chunk_prompt` tokenizes the segments and lays the tokens out in chunks of 75 (each
   becomes 77 with BOS/EOS), as A1111's ``tokenize_line`` does: ``BREAK`` starts a new chunk; a
   chunk that fills up within :data:`COMMA_BACKTRACK` tokens of a comma moves the words after that
   comma to the next chunk; a textual-inversion embedding named in the prompt takes as many token
   slots as it has vectors and never straddles two chunks. :func:`count_tokens` is A1111's
   "123/150" counter, with the CLIP tokenizer built from the shipped vocabulary.
3. ``<lora:NAME:WEIGHT>`` tags: :func:`lora_key` (a prompt's set, for batch keys),
   :func:`strip_lora_tags` (what the text encoder sees), :func:`parse_lora_key` and
   :func:`find_lora` (names and weights checked, with messages saying what to write).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.errors import GenerationError

# ---------------------------------------------------------------------------- 1. emphasis

#: Prompt tokens per chunk; with BOS and EOS each chunk is CLIP's 77 positions.
CHUNK_LENGTH = 75
#: A1111's "prompt word wrap length limit" (its default): a chunk that fills up at most this many
#: tokens after a comma continues in the next chunk from just after that comma.
COMMA_BACKTRACK = 20
#: The weight A1111 gives to the ``BREAK`` marker segment.
BREAK = ("BREAK", -1.0)

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One alternative per token kind, tried in this order at each position (as in A1111).
_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\   # escapes, and a lone backslash
|\(|\[                       # openers
|:\s*([+-]?[.\d]+)\s*\)      # explicit weight and its closing parenthesis
|\)|]                        # closers
|[^\\()\[\]:]+               # plain text
|:                           # a colon that is not a weight
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class PromptSyntaxError(GenerationError, ValueError):
    """The prompt's emphasis syntax cannot be read; write weights as ``(word:1.2)``."""


def _weight(text: str, match: re.Match, written: str) -> float:
    try:
        return float(written)
    except ValueError:
        start = text.rfind("(", 0, match.start())
        shown = text[max(start, 0) : match.end()][-60:]
        raise PromptSyntaxError(
            f"“{shown}”: {written.strip()!r} is not a weight. Write one number after the colon, "
            f"such as (word:1.2), or \\( and \\) for brackets that are part of the text."
        ) from None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``(text, weight)`` segments of a prompt; ``BREAK`` is the segment ``("BREAK", -1.0)``.

    Unbalanced openers apply to the end of the prompt; a closer with no opener is text.
    Neighbouring segments of equal weight are merged. Raises :class:`PromptSyntaxError` for a
    weight that is not a number (``(word:1.2.3)``).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    segments: list[list] = []  # [text, weight], mutable while brackets close
    round_opened: list[int] = []
    square_opened: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            segments.append([token[1:], 1.0])
        elif token == "(":
            round_opened.append(len(segments))
        elif token == "[":
            square_opened.append(len(segments))
        elif weight is not None and round_opened:
            multiply_from(round_opened.pop(), _weight(text, match, weight))
        elif token == ")" and round_opened:
            multiply_from(round_opened.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_opened:
            multiply_from(square_opened.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    segments.append(list(BREAK))
                segments.append([part, 1.0])
    for start in round_opened:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_opened:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for segment in segments or [["", 1.0]]:
        if merged and merged[-1][1] == segment[1]:
            merged[-1][0] += segment[0]
        else:
            merged.append(segment)
    return [(text, weight) for text, weight in merged]


# ---------------------------------------------------------------------------- 2. chunks and counts


class NamedEmbedding(Protocol):
    """A textual-inversion embedding as chunking sees it (:class:`engine.families.sd.prompts.Embedding`)."""

    name: str

    @property
    def length(self) -> int: ...


class Embeddings(Protocol):
    """Finds embeddings by their name's tokens (:class:`engine.families.sd.prompts.EmbeddingLibrary`)."""

    tokenizer: Any

    def find(self, tokens: list[int], position: int) -> tuple[NamedEmbedding, int] | None: ...


@dataclass
class Chunk:
    """Up to 75 prompt tokens, their weights, and where embeddings go (offsets within the 75)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, NamedEmbedding]] = field(default_factory=list)

    def input_ids(self, bos: int, eos: int, pad: int) -> list[int]:
        """77 ids: BOS, the tokens, EOS, then padding (``pad`` is EOS for SD1, ``!`` for open_clip)."""
        ids = [bos, *self.tokens, eos]
        return ids + [pad] * (CHUNK_LENGTH + 2 - len(ids))

    def full_weights(self) -> list[float]:
        return [1.0, *self.weights] + [1.0] * (CHUNK_LENGTH + 1 - len(self.weights))


@dataclass
class ChunkedPrompt:
    chunks: list[Chunk]
    #: A1111's count: 75 for every full chunk (and every chunk a BREAK ends), then the last chunk's.
    token_count: int

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for chunk in self.chunks for w in chunk.weights)


def chunk_prompt(prompt: str, tokenizer, embeddings: Embeddings | None = None) -> ChunkedPrompt:
    """Lay a prompt's tokens out in chunks of 75, as A1111's ``tokenize_line`` does."""
    segments = parse_prompt_attention(prompt)
    texts = [text for text, _ in segments]
    tokenized = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    comma = tokenizer(",", add_special_tokens=False).input_ids[0]

    chunks: list[Chunk] = []
    chunk = Chunk()
    count = 0
    last_comma = -1

    def close_chunk(is_last: bool = False) -> None:
        nonlocal chunk, count, last_comma
        count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for tokens, (text, weight) in zip(tokenized, segments, strict=False):
        if (text, weight) == BREAK:
            close_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (
                len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK
            ):
                # Full, with a comma close behind: the words after it start the next chunk.
                cut = last_comma + 1
                moved_tokens, moved_weights = chunk.tokens[cut:], chunk.weights[cut:]
                del chunk.tokens[cut:], chunk.weights[cut:]
                close_chunk()
                chunk.tokens, chunk.weights = moved_tokens, moved_weights
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()

            found = embeddings.find(tokens, position) if embeddings is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            embedding, name_length = found
            if len(chunk.tokens) + embedding.length > CHUNK_LENGTH:
                close_chunk()
            chunk.fixes.append((len(chunk.tokens), embedding))
            # Placeholder ids (A1111 uses 0): the vectors replace them at the embedding layer.
            chunk.tokens += [0] * embedding.length
            chunk.weights += [weight] * embedding.length
            position += name_length

    if chunk.tokens or not chunks:
        close_chunk(is_last=True)
    return ChunkedPrompt(chunks, count)


def chunks_needed(token_count: int) -> int:
    """How many 75-token chunks ``token_count`` prompt tokens take (at least one)."""
    return max(1, math.ceil(token_count / CHUNK_LENGTH))


@functools.cache
def _plain_tokenizer():
    from engine.families.sd.tokenizer import clip_tokenizer  # transformers' tokenizer; it does not import torch

    return clip_tokenizer()


def count_tokens(prompt: str, embeddings: Embeddings | None = None) -> int:
    """A1111's token count of a prompt (its "123/150" counter), without loading a model.

    Every Stable Diffusion family shares CLIP's vocabulary, so the bot can tell a member how many
    chunks their prompt takes (:func:`chunks_needed`) before the job reaches the engine; pass the
    engine's ``embeddings`` (or use ``PromptEncoder.count_tokens``) to count embeddings' vectors.
    ``<lora:...>`` tags count as the text encoder sees the prompt: not at all.
    """
    tokenizer = embeddings.tokenizer if embeddings is not None else _plain_tokenizer()
    return chunk_prompt(strip_lora_tags(prompt), tokenizer, embeddings).token_count


# ---------------------------------------------------------------------------- 3. LoRA tags

#: ``<lora:name>`` or ``<lora:name:weight>`` (A1111 also reads ``<lora:name:te:unet>``; we refuse it clearly).
LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
#: A LoRA name: a file stem, no path separators; ``..`` is refused separately.
LORA_NAME = re.compile(r"[\w][\w .+\-()\[\]]*", re.UNICODE)
LORA_SUFFIX = ".safetensors"
MAX_LORA_WEIGHT = 10.0

#: A prompt's LoRA set: ``(name, weight text)`` pairs sorted by name, hashable for batch keys.
LoraKey = tuple[tuple[str, str], ...]


def lora_key(prompt: str) -> LoraKey:
    """The LoRA tags of a prompt, as written, sorted: cheap and never raises (checked later)."""
    tags = []
    for body in LORA_TAG.findall(prompt):
        name, _, weight = body.partition(":")
        tags.append((name.strip(), weight.strip()))
    return tuple(sorted(tags))


def strip_lora_tags(prompt: str) -> str:
    """The prompt without its ``<lora:...>`` tags (what the text encoder sees)."""
    if "<" not in prompt:
        return prompt
    return LORA_TAG.sub("", prompt)


@dataclass(frozen=True)
class LoraUse:
    name: str
    weight: float


def parse_lora_key(key: LoraKey) -> tuple[LoraUse, ...]:
    """Check names and weights; the same name twice adds up its weights."""
    weights: dict[str, float] = {}
    for name, weight_text in key:
        check_lora_name(name)
        if not weight_text:
            weight = 1.0
        else:
            try:
                weight = float(weight_text)
            except ValueError:
                raise GenerationError(
                    f"<lora:{name}:{weight_text}>: the weight must be a number such as 0.8 "
                    "(separate text-encoder and UNet weights are not supported)."
                ) from None
        if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
            raise GenerationError(
                f"<lora:{name}:{weight_text}>: the weight must be from -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}."
            )
        weights[name] = weights.get(name, 0.0) + weight
    return tuple(LoraUse(name, weight) for name, weight in weights.items())


def check_lora_name(name: str) -> None:
    if not name or ".." in name or "/" in name or "\\" in name or not LORA_NAME.fullmatch(name):
        raise GenerationError(
            f"<lora:{name[:60]}>: a LoRA is named by its file name only (letters, digits, spaces, "
            "_ - . + and brackets; no folders), e.g. <lora:add_detail:0.8>."
        )


def available_loras(folder: Path | None) -> list[str]:
    """The LoRA names in ``folder`` (none when it is not set or not there)."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix == LORA_SUFFIX and p.is_file())


def find_lora(folder: Path | None, name: str) -> Path:
    """``folder/NAME.safetensors``; GenerationError listing what there is when it is not there."""
    path = None if folder is None else folder / f"{name}{LORA_SUFFIX}"
    if path is None or not path.is_file():
        names = available_loras(folder)
        listed = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "") if names else "none"
        if folder is None:
            listed += " (this model has no LoRA folder configured)"
        raise GenerationError(f"No LoRA named {name!r}; available: {listed}.")
    return path
