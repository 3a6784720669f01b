"""The original single-file key layouts of Flux.1 and SD 3.5, from diffusers modules (tests only).

diffusers ships only original -> diffusers converters (``diffusers/loaders/single_file_utils.py``:
``convert_flux_transformer_checkpoint_to_diffusers``, ``convert_sd3_transformer_checkpoint_to_diffusers``,
``convert_ldm_clip_checkpoint``, ``convert_sd3_t5_checkpoint_to_diffusers``); the reverse mappings
live here, driven by the configs (block counts), and tests/test_tinyflow.py checks them by a round
trip through those converters. Names follow the reference code: BFL's ``flux/model.py`` and SAI's
``sd3_impls/mmditx.py``; text encoders and VAE as ComfyUI saves them (HF names for CLIP and T5, LDM
names for the VAE, see tests/tinymodel.py ``vae_to_ldm``).
"""

from __future__ import annotations

from engine.torch_builds import torchvision_importable

torchvision_importable()  # before diffusers imports it (see engine/torch_builds.py)

import torch  # noqa: E402
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from transformers import T5EncoderModel  # noqa: E402

from tinymodel import vae_to_ldm  # noqa: E402

FLUX_TOP = {  # diffusers prefix -> BFL prefix (flux/model.py)
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "context_embedder.": "txt_in.",
    "x_embedder.": "img_in.",
    "proj_out.": "final_layer.linear.",
    "norm_out.linear.": "final_layer.adaLN_modulation.1.",
}
FLUX_DOUBLE = {
    "norm1.linear.": "img_mod.lin.",
    "norm1_context.linear.": "txt_mod.lin.",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.": "img_attn.proj.",
    "attn.to_add_out.": "txt_attn.proj.",
    "ff.net.0.proj.": "img_mlp.0.",
    "ff.net.2.": "img_mlp.2.",
    "ff_context.net.0.proj.": "txt_mlp.0.",
    "ff_context.net.2.": "txt_mlp.2.",
}
FLUX_SINGLE = {
    "norm.linear.": "modulation.lin.",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out.": "linear2.",
}
SD3_TOP = {  # diffusers prefix -> SAI prefix (sd3_impls/mmditx.py)
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.": "x_embedder.proj.",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "context_embedder.": "context_embedder.",
    "proj_out.": "final_layer.linear.",
    "norm_out.linear.": "final_layer.adaLN_modulation.1.",
}
SD3_JOINT = {
    "norm1.linear.": "x_block.adaLN_modulation.1.",
    "norm1_context.linear.": "context_block.adaLN_modulation.1.",
    "attn.norm_q.weight": "x_block.attn.ln_q.weight",
    "attn.norm_k.weight": "x_block.attn.ln_k.weight",
    "attn.norm_added_q.weight": "context_block.attn.ln_q.weight",
    "attn.norm_added_k.weight": "context_block.attn.ln_k.weight",
    "attn.to_out.0.": "x_block.attn.proj.",
    "attn.to_add_out.": "context_block.attn.proj.",
    "attn2.norm_q.weight": "x_block.attn2.ln_q.weight",
    "attn2.norm_k.weight": "x_block.attn2.ln_k.weight",
    "attn2.to_out.0.": "x_block.attn2.proj.",
    "ff.net.0.proj.": "x_block.mlp.fc1.",
    "ff.net.2.": "x_block.mlp.fc2.",
    "ff_context.net.0.proj.": "context_block.mlp.fc1.",
    "ff_context.net.2.": "context_block.mlp.fc2.",
}
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
QKV2 = ("attn2.to_q", "attn2.to_k", "attn2.to_v")


def _swap_scale_shift(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift), the originals' (shift, scale)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _native(state: dict, fused: dict, renames: dict, swapped: list[str]) -> dict:
    """Fuse ``fused[native] = (diffusers parts)`` (weight and bias), rename the rest by the
    longest matching prefix, and swap (scale, shift) for the ``swapped`` native prefixes."""
    state, out = dict(state), {}
    for native, parts in fused.items():
        for kind in ("weight", "bias"):
            if f"{parts[0]}.{kind}" in state:
                out[f"{native}.{kind}"] = torch.cat([state.pop(f"{part}.{kind}") for part in parts])
    ordered = sorted(renames, key=len, reverse=True)
    for key, tensor in state.items():
        prefix = next((p for p in ordered if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"no original name for {key}")
        out[renames[prefix] + key[len(prefix) :]] = tensor
    for native in swapped:
        for kind in ("weight", "bias"):
            out[native + kind] = _swap_scale_shift(out[native + kind])
    return out


def flux_to_bfl(transformer: FluxTransformer2DModel) -> dict:
    """diffusers Flux transformer -> BFL's names (``double_blocks.0.img_attn.qkv.weight``, ...)."""
    fused, renames = {}, dict(FLUX_TOP)
    for i in range(transformer.config.num_layers):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        fused[dst + "img_attn.qkv"] = tuple(src + p for p in QKV)
        fused[dst + "txt_attn.qkv"] = tuple(src + p for p in ADDED_QKV)
        renames |= {src + a: dst + b for a, b in FLUX_DOUBLE.items()}
    for i in range(transformer.config.num_single_layers):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        fused[dst + "linear1"] = tuple(src + p for p in (*QKV, "proj_mlp"))
        renames |= {src + a: dst + b for a, b in FLUX_SINGLE.items()}
    return _native(transformer.state_dict(), fused, renames, ["final_layer.adaLN_modulation.1."])


def sd3_to_sai(transformer: SD3Transformer2DModel) -> dict:
    """diffusers SD3 transformer -> SAI's MMDiT names (``joint_blocks.0.x_block.attn.qkv.weight``)."""
    fused, renames = {}, dict(SD3_TOP)
    last = transformer.config.num_layers - 1
    for i in range(last + 1):
        src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        fused[dst + "x_block.attn.qkv"] = tuple(src + p for p in QKV)
        fused[dst + "context_block.attn.qkv"] = tuple(src + p for p in ADDED_QKV)
        fused[dst + "x_block.attn2.qkv"] = tuple(src + p for p in QKV2)  # MMDiT-X (3.5 Medium)
        renames |= {src + a: dst + b for a, b in SD3_JOINT.items()}
    # The last context block only modulates (context_pre_only): a (shift, scale) pair, as the final layer.
    swapped = ["final_layer.adaLN_modulation.1.", f"joint_blocks.{last}.context_block.adaLN_modulation.1."]
    return _native(transformer.state_dict(), fused, renames, swapped)


def clip_keys(encoder, prefix: str, projection: bool = True) -> dict:
    """HF CLIP as SD3/Flux files carry it: ``<prefix>text_model.*`` (+ ``text_projection.weight``)."""
    out = {}
    for key, tensor in encoder.state_dict().items():
        if key == "text_projection.weight":
            if projection:
                out[prefix + key] = tensor
            continue
        out[prefix + ("" if key.startswith("text_model.") else "text_model.") + key] = tensor
    return out


def t5_keys(encoder: T5EncoderModel, prefix: str) -> dict:
    """HF T5 names under ``prefix``, without ``encoder.embed_tokens.weight``: it is tied to
    ``shared.weight``, and the T5 of SAI's reference code and of ComfyUI has ``shared`` only."""
    state = encoder.state_dict()
    return {prefix + k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def vae_keys(vae: AutoencoderKL, prefix: str) -> dict:
    """LDM VAE names (attention as 1x1 convolutions, as BFL's ae.safetensors) under ``prefix``."""
    return {prefix + k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(vae).items()}


def to_fp8(state: dict, dtype: torch.dtype | None) -> dict:
    """Linear weights (the 2-D ``.weight`` tensors) stored in ``dtype``, as Comfy's and Forge's
    fp8 files; norms, biases, convolutions and position tables keep theirs."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.ndim == 2 and k.endswith(".weight") else v for k, v in state.items()}
