"""The CLIP tokenizer every Stable Diffusion family uses, built offline from a shipped file.

SD1, SD2 and both SDXL text encoders share OpenAI's CLIP BPE vocabulary (49,408 tokens). We ship
open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (1.3 MB, MIT licence) in ``engine/data`` and derive
the vocabulary the way OpenAI's ``SimpleTokenizer`` does: the 256 byte symbols, the same with
``</w>``, one token per merge, then the two special tokens. transformers' ``CLIPTokenizer``
takes that vocabulary and merge list in memory, so nothing is written and nothing is downloaded.

The families differ only in the padding token: ``<|endoftext|>`` for SD1 and SDXL's first
tokenizer, ``!`` for SD2 and SDXL's second (the open_clip convention: pad id 0).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = Path(__file__).parents[2] / "data" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """OpenAI's reversible byte -> printable character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@functools.cache
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and BPE merge pairs, by rank."""
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """A fresh CLIP tokenizer (77 tokens); ``pad_token`` is ``"!"`` for open_clip encoders."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)
