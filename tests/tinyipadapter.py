"""Tiny random-weight IP-Adapters (plain and Plus) for a tiny SD UNet, in the layout of
``ip-adapter_sd15.safetensors`` / ``ip-adapter-plus_sd15.safetensors`` (``image_proj.*`` with the
original Resampler's names for Plus, ``ip_adapter.{1,3,5...}.to_{k,v}_ip.weight``), and a tiny
``CLIPVisionModelWithProjection`` saved as a transformers folder ``image_encoder`` beside them, as
diffusers' ``load_ip_adapter(folder, subfolder="", weight_name=...)`` finds it.

The projections are diffusers' own classes (``ImageProjection``, ``IPAdapterPlusImageProjection``:
depth 4 and 64-wide heads, which its converter assumes), their names turned back into the file's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

ENCODER_WIDTH, ENCODER_PROJECTION = 32, 24


def save_image_encoder(folder: Path, seed: int = 0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=ENCODER_WIDTH,
        intermediate_size=37,
        projection_dim=ENCODER_PROJECTION,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    encoder = CLIPVisionModelWithProjection(config).eval()
    encoder.save_pretrained(folder / "image_encoder")
    return encoder


def plus_to_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IPAdapterPlusImageProjection's names -> the original Resampler's (inverse of diffusers')."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        renamed = {
            "ln0.weight": "0.norm1.weight",
            "ln0.bias": "0.norm1.bias",
            "ln1.weight": "0.norm2.weight",
            "ln1.bias": "0.norm2.bias",
            "attn.to_q.weight": "0.to_q.weight",
            "attn.to_out.0.weight": "0.to_out.weight",
            "ff.0.weight": "1.0.weight",
            "ff.0.bias": "1.0.bias",
            "ff.1.net.0.proj.weight": "1.1.weight",
            "ff.1.net.2.weight": "1.3.weight",
        }
        if rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{i}.attn.to_v.weight"]])
        elif rest != "attn.to_v.weight":
            out[f"layers.{i}.{renamed[rest]}"] = value
    return out


def save_ip_adapter(folder: Path, unet, name: str, *, plus: bool, seed: int) -> Path:
    """``folder/name.safetensors`` for ``unet`` (its cross-attention width and layers)."""
    torch.manual_seed(seed)
    width = unet.config.cross_attention_dim
    if plus:
        projection = IPAdapterPlusImageProjection(
            embed_dims=ENCODER_WIDTH, output_dims=width, hidden_dims=64, heads=1, num_queries=4
        )
        image_proj = plus_to_file(projection.state_dict())
    else:
        projection = ImageProjection(
            cross_attention_dim=width, image_embed_dim=ENCODER_PROJECTION, num_image_text_embeds=4
        )
        image_proj = {k.replace("image_embeds", "proj"): v for k, v in projection.state_dict().items()}
    state = {f"image_proj.{k}": v for k, v in image_proj.items()}
    generator = torch.Generator().manual_seed(seed)
    key_id = 1
    for name_ in unet.attn_processors:
        if name_.endswith("attn1.processor"):
            continue
        if name_.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name_.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name_[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name_[len("down_blocks.")])]
        for kind in ("k", "v"):
            state[f"ip_adapter.{key_id}.to_{kind}_ip.weight"] = torch.randn((hidden, width), generator=generator) * 0.3
        key_id += 2
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
