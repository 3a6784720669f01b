"""Tiny random-weight ControlNets (diffusers' real ``ControlNetModel``) for a tiny SD model, written
as a diffusers folder and as an LDM-layout single file (the layout of A1111's
``control_v11p_sd15_canny.safetensors``, without the ``control_model.`` prefix), with a config
folder of the file's stem beside it (the tiny shapes are not the shipped configs').

``ControlNetModel.from_unet`` copies the UNet's encoder; the zero convolutions (and the hint
encoder's last conv) start at zero in a fresh ControlNet, which would make every residual zero,
so every weight is drawn again from a seeded generator.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, ControlNetUnionModel
from safetensors.torch import save_file

from tinymodel import RESNET_NAMES, _rename


def tiny_controlnet(unet, seed: int, union: bool = False) -> ControlNetModel | ControlNetUnionModel:
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    if union:  # its control-type transformer at the tiny UNet's width (from_unet keeps SDXL's 320)
        width = unet.config.block_out_channels[0]
        config = dict(net.config) | dict(num_trans_channel=width, num_trans_head=2, num_proj_channel=width)
        net = ControlNetUnionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return net.eval()


def controlnet_to_ldm(net: ControlNetModel) -> dict:
    """diffusers ControlNet state dict -> the LDM names (inverse of diffusers' converter)."""
    config, per = net.config, net.config.layers_per_block + 1
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
        "controlnet_mid_block.": "middle_block_out.0.",
        "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
        "controlnet_cond_embedding.conv_out.": "input_hint_block.14.",
    }
    for j in range(len(net.controlnet_cond_embedding.blocks)):
        prefixes[f"controlnet_cond_embedding.blocks.{j}."] = f"input_hint_block.{2 * (j + 1)}."
    for j in range(len(net.controlnet_down_blocks)):
        prefixes[f"controlnet_down_blocks.{j}."] = f"zero_convs.{j}.0."
    for b in range(len(config.down_block_types)):
        for j in range(config.layers_per_block):
            i = 1 + b * per + j
            prefixes[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{i}.0."
            prefixes[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{i}.1."
        prefixes[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{1 + b * per + per - 1}.0.op."
    inner = {p: RESNET_NAMES for p in prefixes if ".resnets." in p}
    return _rename(net.state_dict(), prefixes, inner)


def save_controlnets(folder: Path, unet, seeds: dict[str, int]) -> dict[str, ControlNetModel]:
    """Each name as a diffusers folder; ``NAME.safetensors`` names (their stem) as single files."""
    folder.mkdir(parents=True, exist_ok=True)
    nets = {}
    for name, seed in seeds.items():
        net = nets[name] = tiny_controlnet(unet, seed)
        if name.endswith(".safetensors"):
            stem = folder / Path(name).stem
            save_file({k: v.contiguous() for k, v in controlnet_to_ldm(net).items()}, str(stem) + ".safetensors")
            net.save_config(stem)  # the config folder beside the file
        else:
            net.save_pretrained(folder / name)
    return nets


def save_union(folder: Path, unet, seed: int) -> ControlNetUnionModel:
    """A tiny union ControlNet as ``union`` (a diffusers folder) and ``union-file.safetensors`` in
    diffusers' layout with its config folder beside it, as xinsir's are shipped."""
    net = tiny_controlnet(unet, seed, union=True)
    net.save_pretrained(folder / "union")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "union-file.safetensors"))
    net.save_config(folder / "union-file")
    return net
