"""A tiny random-weight image classifier built from transformers' real classes (ViT), saved with
``save_pretrained`` as an operator's local folder would be. ``verdict`` forces the decision: the
classifier's bias makes that label win on every image, whatever the random weights say."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.torch_builds import torchvision_importable

torchvision_importable()  # before transformers imports it (engine/torch_builds.py)
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor  # noqa: E402

LABELS = {0: "normal", 1: "nsfw"}


def save_tiny_classifier(folder: Path, verdict: str | None = None, *, nsfw_score: float | None = None) -> Path:
    """A ViT classifier of 32x32 images with the labels normal / nsfw, in ``folder``.
    ``verdict``: "nsfw" or "normal" always wins; ``nsfw_score``: the nsfw probability of every image."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=16,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    model = ViTForImageClassification(config).eval()
    if verdict is not None or nsfw_score is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()  # the bias alone decides
            p = nsfw_score if nsfw_score is not None else (0.999 if verdict == "nsfw" else 0.001)
            logit = float(torch.logit(torch.tensor(p, dtype=torch.float64)))
            model.classifier.bias.copy_(torch.tensor([0.0, logit]))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
