"""A tiny random-weight captioner built from transformers' real classes (BLIP's
``BlipForConditionalGeneration`` with its ``BlipProcessor``: a BERT tokenizer of a small word
list and BLIP's image processor), saved with ``save_pretrained`` as an operator's folder would be.
Its captions are random words from the list: enough to show four prompts reach their buttons."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.torch_builds import torchvision_importable

torchvision_importable()  # before transformers imports it (engine/torch_builds.py)
from transformers import (  # noqa: E402
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

WORDS = ["a", "fox", "in", "snow", "red", "cat", "painting", "of", "the", "blue", "sky", "photo", "dog", "tree", "old",
         "castle", "river", "night", "golden", "light", "forest", "portrait", "woman", "city"]  # fmt: skip
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def save_tiny_captioner(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS))
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64, bos_token_id=5,
                         pad_token_id=0, sep_token_id=3, encoder_hidden_size=32),
    )  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
