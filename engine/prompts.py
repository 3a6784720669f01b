"""Prompts as people write them in AUTOMATIC1111: emphasis, ``BREAK``, long prompts, embeddings.

From a prompt string to what the text encoders read, in three pure steps:

1. :func:`parse_prompt_attention` splits the prompt into ``(text, weight)`` segments with the
   same results as AUTOMATIC1111's function of that name: ``(word)`` x1.1, ``((word))`` x1.21,
   ``[word]`` /1.1, ``(word:1.3)``, escapes ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``, and ``BREAK``.
2. :func:`chunk_prompt` tokenizes the segments and lays the tokens out in chunks of 75 (each
   becomes 77 with BOS/EOS), as A1111's ``tokenize_line`` does: ``BREAK`` starts a new chunk; a
   chunk that fills up within :data:`COMMA_BACKTRACK` tokens of a comma moves the words after that
   comma to the next chunk; a textual-inversion embedding named in the prompt takes as many token
   slots as it has vectors and never straddles two chunks.
3. The encoder (:class:`engine.denoiser.PromptEncoder`) runs every chunk through the text
   encoder(s), puts the embedding vectors in at the token-embedding layer, scales each token's
   hidden state by its weight and restores the chunk's original mean (A1111's "original"
   emphasis), and joins the chunks along the token axis: 77 * chunks tokens, nothing cut.

Long prompts and batching. A job's conditioning is as long as its own prompts need, and its
positive and negative prompt may differ in length. Padding a short conditioning with extra
tokens (A1111 repeats the last vector or adds empty-prompt chunks) would change what
cross-attention computes, so an image would depend on what shared its batch. Instead
``Conditioning.cat`` pads shorter rows with zeros *and masks them out* of cross-attention
(``encoder_attention_mask``, a -10000 bias: their softmax weight is exactly 0). Each row then
attends to exactly its own tokens, which is also what A1111 computes by default for a prompt and
negative prompt of different lengths (it runs them as separate UNet calls). Jobs with any chunk
counts keep sharing one batch, so the worker's admission needs no change; a batch where every
row has the same length passes no mask at all, i.e. the UNet call is the one it always was.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: Prompt tokens per chunk; with BOS and EOS each chunk is CLIP's 77 positions.
CHUNK_LENGTH = 75
#: A1111's "prompt word wrap length limit" (its default): a chunk that fills up at most this many
#: tokens after a comma continues in the next chunk from just after that comma.
COMMA_BACKTRACK = 20
#: The weight A1111 gives to the ``BREAK`` marker segment.
BREAK = ("BREAK", -1.0)
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One alternative per token kind, tried in this order at each position (as in A1111).
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\   # escapes, and a lone backslash
|\(|\[                       # openers
|:\s*([+-]?[.\d]+)\s*\)      # explicit weight and its closing parenthesis
|\)|]                        # closers
|[^\\()\[\]:]+               # plain text
|:                           # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


# ---------------------------------------------------------------------------- 1. parsing

def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``(text, weight)`` segments of a prompt; ``BREAK`` is the segment ``("BREAK", -1.0)``.

    Unbalanced openers apply to the end of the prompt; a closer with no opener is text.
    Neighbouring segments of equal weight are merged.

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
            multiply_from(round_opened.pop(), float(weight))
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


# ---------------------------------------------------------------------------- embeddings

@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding: per text encoder, ``[n, width]`` vectors (float32, CPU)."""

    name: str
    vectors: tuple[Tensor, ...]

    @property
    def length(self) -> int:
        return self.vectors[0].shape[0]


def read_embedding_file(path: Path) -> dict[str, Tensor]:
    """The tensors of an embedding file, by key (``.pt``/``.bin`` are read without unpickling code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError("not a dict of tensors")
    if "string_to_param" in data:  # A1111's own training output
        params = data["string_to_param"]
        if len(params) != 1:
            raise ValueError("the file holds several terms")
        return {"emb_params": next(iter(params.values()))}
    return {key: value for key, value in data.items() if isinstance(value, Tensor)}


def embedding_vectors(data: dict[str, Tensor], widths: list[int]) -> tuple[Tensor, ...] | None:
    """Vectors for each text encoder of widths ``widths``, or None when made for another family.

    SDXL files hold ``clip_l`` and ``clip_g`` (first and second encoder); SD1/SD2 files hold one
    tensor (``emb_params``, a ``string_to_param`` entry, or a diffusers concept's single key).
    """
    if "clip_l" in data and "clip_g" in data:
        vectors = (data["clip_l"], data["clip_g"])
    elif len(data) == 1:
        vectors = (next(iter(data.values())),)
    else:
        return None
    vectors = tuple((v[None] if v.dim() == 1 else v).detach().float() for v in vectors)
    if [v.shape[-1] for v in vectors] != widths or len({v.shape[0] for v in vectors}) != 1:
        return None
    return vectors


class EmbeddingLibrary:
    """Textual-inversion embeddings from a folder, found in prompts by their file stem.

    As in A1111, an embedding is matched on the token ids of its name, so ``my-style`` in a
    prompt finds ``my-style.safetensors``. Files made for another model family (other widths) are
    skipped, and so are files that cannot be read (logged). The folder is read again when its
    modification time changes (a file added, removed or renamed), so a server owner can drop an
    embedding in without a restart; a file overwritten in place is seen after a restart.
    """

    def __init__(self, folder: str | Path | None, tokenizer, widths: list[int]) -> None:
        self.folder = None if folder is None else Path(folder)
        self.tokenizer, self.widths = tokenizer, widths
        self.by_first_id: dict[int, list[tuple[list[int], Embedding]]] = {}
        self.names: list[str] = []
        self._seen_mtime = self._mtime()
        if self.folder is not None:
            if not self.folder.is_dir():
                log.warning("embeddings folder %s is not a folder; no embeddings until it is", self.folder)
            self._load()

    def _mtime(self) -> float | None:
        try:
            return None if self.folder is None else self.folder.stat().st_mtime
        except OSError:
            return None

    def refresh(self) -> bool:
        """Re-read the folder if it changed; True if it did (encodings made before are stale)."""
        if self.folder is None:
            return False
        mtime = self._mtime()
        if mtime == self._seen_mtime:
            return False
        self._seen_mtime = mtime
        self._load()
        return True

    def _load(self) -> None:
        self.by_first_id, self.names = {}, []
        paths = sorted(self.folder.iterdir()) if self.folder.is_dir() else []
        for path in paths:
            if path.suffix not in EMBEDDING_SUFFIXES or not path.is_file():
                continue
            try:
                vectors = embedding_vectors(read_embedding_file(path), self.widths)
            except Exception:  # one bad file must not take the others (or the engine) down
                log.exception("skipping embedding %s: it could not be read", path)
                continue
            if vectors is None:
                log.info("skipping embedding %s: not made for this model's text encoders", path.name)
                continue
            self.add(Embedding(path.stem, vectors))

    def add(self, embedding: Embedding) -> None:
        ids = self.tokenizer(embedding.name, add_special_tokens=False).input_ids
        if not ids:
            return
        matches = self.by_first_id.setdefault(ids[0], [])
        matches.append((ids, embedding))
        matches.sort(key=lambda match: len(match[0]), reverse=True)  # longest name first
        self.names.append(embedding.name)

    def find(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at ``tokens[position]``, and that many tokens."""
        for ids, embedding in self.by_first_id.get(tokens[position], ()):
            if tokens[position : position + len(ids)] == ids:
                return embedding, len(ids)
        return None


# ---------------------------------------------------------------------------- 2. chunking

@dataclass
class Chunk:
    """Up to 75 prompt tokens, their weights, and where embeddings go (offsets within the 75)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)

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


def chunk_prompt(prompt: str, tokenizer, embeddings: EmbeddingLibrary | None = None) -> ChunkedPrompt:
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

    for tokens, (text, weight) in zip(tokenized, segments):
        if (text, weight) == BREAK:
            close_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
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
    from engine.tokenizer import clip_tokenizer

    return clip_tokenizer()


def count_tokens(prompt: str, embeddings: EmbeddingLibrary | None = None) -> int:
    """A1111's token count of a prompt (its "123/150" counter), without loading a model.

    Every Stable Diffusion family shares CLIP's vocabulary, so the bot can tell a member how many
    chunks their prompt takes (:func:`chunks_needed`) before the job reaches the engine; pass the
    engine's ``embeddings`` (or use ``PromptEncoder.count_tokens``) to count embeddings' vectors.
    """
    tokenizer = embeddings.tokenizer if embeddings is not None else _plain_tokenizer()
    return chunk_prompt(prompt, tokenizer, embeddings).token_count


# ---------------------------------------------------------------------------- 3. encoding helpers

def emphasize(hidden: Tensor, weights: Tensor) -> Tensor:
    """A1111's "original" emphasis, per chunk: scale each token by its weight, restore the mean.

    ``hidden`` is ``[chunks, 77, width]``, ``weights`` ``[chunks, 77]``. Done in float32 so that a
    float16 encoder's output keeps its precision through the rescaling.
    """
    z = hidden.float()
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[:, :, None].to(z)
    z = z * (original_mean / z.mean(dim=(1, 2), keepdim=True))
    return z.to(hidden.dtype)


class embeddings_injected:
    """Context manager: the text encoder's token-embedding layer outputs the embeddings' vectors.

    ``fixes[c]`` lists ``(offset, vectors)`` for chunk (batch row) ``c``; offsets count prompt
    tokens, so the vectors land after BOS. A forward hook on the layer, removed on exit: the
    encoder is shared, and prompts without embeddings never see the hook.
    """

    def __init__(self, encoder, fixes: list[list[tuple[int, Tensor]]]) -> None:
        self.layer = encoder.get_input_embeddings()
        self.fixes = fixes
        self.handle = None

    def _hook(self, module, args, output: Tensor) -> Tensor:
        output = output.clone()
        for row, row_fixes in enumerate(self.fixes):
            for offset, vectors in row_fixes:
                output[row, 1 + offset : 1 + offset + vectors.shape[0]] = vectors.to(output)
        return output

    def __enter__(self):
        if any(self.fixes):
            self.handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
