"""Prompts as people write them in AUTOMATIC1111: emphasis, ``BREAK``, long prompts, embeddings.

From a prompt string to what the text encoders read, in three steps:

1. :func:`~engine.prompt_syntax.parse_prompt_attention` splits the prompt into ``(text, weight)``
   segments, and 2. :func:`~engine.prompt_syntax.chunk_prompt` lays its tokens out in chunks of
   75, as A1111 does: both are torch-free, in :mod:`engine.prompt_syntax`, so that the bot reads
   prompts the same way without loading the engine (their names stay importable from here).
   A textual-inversion embedding named in the prompt (:class:`EmbeddingLibrary`, here) takes as
   many token slots as it has vectors and never straddles two chunks.
3. The encoder (:class:`engine.families.sd.denoiser.PromptEncoder`) runs every chunk through the text
   encoder(s), puts the embedding vectors in at the token-embedding layer, scales each token's
   hidden state by its weight and restores the chunk's original mean (A1111's "original"
   emphasis, :func:`emphasize`), and joins the chunks along the token axis: 77 * chunks tokens,
   nothing cut.

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

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from engine.prompt_syntax import (
    BREAK,
    CHUNK_LENGTH,
    COMMA_BACKTRACK,
    ROUND_MULTIPLIER,
    SQUARE_MULTIPLIER,
    Chunk,
    ChunkedPrompt,
    PromptSyntaxError,
    chunk_prompt,
    chunks_needed,
    count_tokens,
    parse_prompt_attention,
)

# The parsing and chunking names, kept importable from here, and this module's own.
__all__ = [
    "BREAK",
    "CHUNK_LENGTH",
    "COMMA_BACKTRACK",
    "ROUND_MULTIPLIER",
    "SQUARE_MULTIPLIER",
    "Chunk",
    "ChunkedPrompt",
    "PromptSyntaxError",
    "chunk_prompt",
    "chunks_needed",
    "count_tokens",
    "parse_prompt_attention",
    "Embedding",
    "EmbeddingLibrary",
    "embedding_vectors",
    "emphasize",
    "embeddings_injected",
    "read_embedding_file",
]

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


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


# ---------------------------------------------------------------------------- encoding helpers


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
