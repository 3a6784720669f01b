"""Tiny LoRA files in the kohya / AUTOMATIC1111 layout, for the tiny models of :mod:`tinymodel`.

Real LoRA files from model sites name each low-rank pair after the module it changes, with dots
turned into underscores: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
for the UNet's attention projections and ``lora_te_text_model_<module>...`` for the text encoder
(SDXL: ``lora_te1_`` and ``lora_te2_``). The tensors here are random but large enough that a
LoRA at weight 1 visibly changes a tiny model's image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _pairs(
    module: torch.nn.Module, prefix: str, targets: tuple[str, ...], rank: int, generator: torch.Generator, scale: float
) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in module.named_modules():
        if not any(name.endswith("." + t) for t in targets) or not isinstance(layer, torch.nn.Linear):
            continue
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * scale
        out[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * scale
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def kohya_lora(
    components: dict, *, rank: int = 4, seed: int = 1, scale: float = 0.5, text_encoder: bool = True
) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA for a tiny SD1/SD2 model's components (``build_tiny_components``)."""
    generator = torch.Generator().manual_seed(seed)
    state = _pairs(components["unet"], "lora_unet_", UNET_TARGETS, rank, generator, scale)
    if text_encoder:
        state |= _pairs(components["text_encoder"], "lora_te_text_model_", TEXT_TARGETS, rank, generator, scale)
    return state


def save_tiny_lora(path: str | Path, family: str = "sd1", **kwargs) -> Path:
    """Write :func:`kohya_lora` for the tiny model of ``family`` (same shapes for any model seed)."""
    from tinymodel import build_tiny_components

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_lora(build_tiny_components(family), **kwargs), path)
    return path
