"""Tiny random-weight Stable Diffusion models (SD1, SD2, SDXL shapes) for fast CPU tests.

The components are real diffusers/transformers classes with small configs that keep each
family's structure: SD1's CLIP (quick_gelu) vs SD2's open_clip text encoder (gelu, ``v_prediction``
scheduler), SDXL's two text encoders of different widths plus the ``text_time`` embedding, and a
4-block VAE so that one latent cell is 8x8 pixels as in the real checkpoints. All tokenizers are
the real 49,408-token CLIP tokenizer.

``in_channels=9`` makes the UNet an inpainting one (latents, mask, masked image latents, as
``stable-diffusion-inpainting``), ``in_channels=8`` an InstructPix2Pix-shaped one (which the
engine refuses); the rest of the model is the same. They can be written two ways:

* :func:`save_diffusers_folder` -- ``save_pretrained`` layout (``model_index.json`` + subfolders);
* :func:`save_single_file` -- one ``.safetensors`` in the original LDM/SGM key layout, the way
  people download checkpoints. diffusers ships only LDM -> diffusers converters, so the reverse
  mapping lives here (:func:`to_ldm_state_dict`), driven by the configs; tests check it by a
  round trip through the real loader. Next to the file goes a weight-less config folder with the
  same stem, which :func:`engine.families.loading.load_model` picks up instead of the shipped full-size
  configs.
"""

from __future__ import annotations

from pathlib import Path

from engine.torch_builds import torchvision_importable

torchvision_importable()  # before diffusers imports it (see engine/torch_builds.py)

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from engine.families.sd.tokenizer import EOS, clip_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
TEXT_WIDTH = 32  # every first text encoder
SDXL_TEXT2_WIDTH = 64  # must differ from TEXT_WIDTH: diffusers tells the two apart by width
TIME_EMBED_DIM = 8  # SDXL micro-conditioning: 6 numbers, each embedded in this many channels


# ---------------------------------------------------------------------------- building


def clip_text_encoder(width: int, act: str, with_projection: bool = False):
    """A tiny CLIP text encoder (the real 49,408-token vocabulary): every family's, SD 3.5's and Flux's too."""
    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=width,
        hidden_act=act,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _unet(family: str, in_channels: int = 4) -> UNet2DConditionModel:
    # One resnet per level (real models have two) halves the time per step; the LDM mapping is
    # driven by layers_per_block either way.
    common = dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=32,
    )
    if family == "sdxl":
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=TEXT_WIDTH + SDXL_TEXT2_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=SDXL_TEXT2_WIDTH + 6 * TIME_EMBED_DIM,
        )
    sd2 = family == "sd2"
    return UNet2DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        cross_attention_dim=TEXT_WIDTH,
    )


def _vae(family: str) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def _scheduler(family: str) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
    )


def build_tiny_components(family: str = "sd1", seed: int = 0, in_channels: int = 4) -> dict:
    """Random-weight components keyed like a diffusers pipeline's (``unet``, ``vae``, ...)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    torch.manual_seed(seed)
    act = "quick_gelu" if family != "sd2" else "gelu"
    components = {
        "unet": _unet(family, in_channels).eval(),
        "vae": _vae(family).eval(),
        "text_encoder": clip_text_encoder(TEXT_WIDTH, act),
        "tokenizer": clip_tokenizer(EOS if family != "sd2" else "!"),
        "scheduler": _scheduler(family),
    }
    if family == "sdxl":
        components["text_encoder_2"] = clip_text_encoder(SDXL_TEXT2_WIDTH, "gelu", True)
        components["tokenizer_2"] = clip_tokenizer("!")
    return components


def _pipeline(family: str, components: dict):
    if family == "sdxl":
        return StableDiffusionXLPipeline(**components)
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def save_diffusers_folder(path: str | Path, family: str = "sd1", seed: int = 0, in_channels: int = 4) -> Path:
    """Write a tiny model as a diffusers folder (``save_pretrained``) and return its path."""
    _pipeline(family, build_tiny_components(family, seed, in_channels)).save_pretrained(path)
    return Path(path)


def save_single_file(path: str | Path, family: str = "sd1", seed: int = 0, in_channels: int = 4) -> Path:
    """Write a tiny model as one LDM-layout ``.safetensors`` plus its config folder beside it.

    The config folder is ``path`` without the suffix (``tiny.safetensors`` -> ``tiny/``) and
    holds no weights, only what diffusers' single-file loader needs to build the components.
    """
    path = Path(path)
    components = build_tiny_components(family, seed, in_channels)
    save_file(to_ldm_state_dict(family, components), path)
    pipe = _pipeline(family, components)
    config_dir = path.with_suffix("")
    pipe.save_config(config_dir)
    for name, module in components.items():
        if name.startswith("tokenizer"):
            continue
        # diffusers objects have save_config; transformers models keep theirs on .config
        saver = getattr(module, "save_config", None) or module.config.save_pretrained
        saver(config_dir / name)
    return path


# ---------------------------------------------------------------------------- LDM layout

RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state: dict, prefixes: dict[str, str], inner: dict[str, dict[str, str]]) -> dict:
    """Map each key by its longest matching prefix; ``inner[prefix]`` renames the remainder."""
    ordered = sorted(prefixes, key=len, reverse=True)
    out = {}
    for key, tensor in state.items():
        prefix = next((p for p in ordered if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"no LDM name for {key}")
        rest = key[len(prefix) :]
        for old, new in inner.get(prefix, {}).items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
        out[prefixes[prefix] + rest] = tensor
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict:
    """diffusers UNet state dict -> ``model.diffusion_model.*`` (inverse of diffusers' converter)."""
    config, per = unet.config, unet.config.layers_per_block + 1  # LDM: resnets + down/upsampler
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for b in range(len(config.down_block_types)):
        for j in range(config.layers_per_block):
            i = 1 + b * per + j
            prefixes[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{i}.0."
            prefixes[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{i}.1."
        prefixes[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{1 + b * per + per - 1}.0.op."
    for b, block_type in enumerate(config.up_block_types):
        for j in range(per):
            prefixes[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{b * per + j}.0."
            prefixes[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{b * per + j}.1."
        slot = 2 if block_type.startswith("CrossAttn") else 1
        prefixes[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{b * per + per - 1}.{slot}.conv."
    inner = {p: RESNET_NAMES for p in prefixes if ".resnets." in p}
    state = _rename(unet.state_dict(), prefixes, inner)
    return {"model.diffusion_model." + k: v for k, v in state.items()}


def vae_to_ldm(vae: AutoencoderKL) -> dict:
    """diffusers VAE state dict -> ``first_stage_model.*`` (attention as 1x1 convs, as in LDM)."""
    n = len(vae.config.block_out_channels)
    prefixes = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        prefixes |= {
            f"{part}.conv_in.": f"{part}.conv_in.",
            f"{part}.conv_out.": f"{part}.conv_out.",
            f"{part}.conv_norm_out.": f"{part}.norm_out.",
            f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1.",
            f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
            f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
        }
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    state = {}
    for key, tensor in vae.state_dict().items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid_block.attentions.0." in key:
            for old, new in VAE_ATTENTION_NAMES.items():
                key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        state[key] = tensor
    return {"first_stage_model." + k: v for k, v in _rename(state, prefixes, {}).items()}


def clip_to_ldm(encoder: CLIPTextModel, prefix: str) -> dict:
    """HF CLIP text model -> ``<prefix>text_model.*`` (the layout LDM's FrozenCLIPEmbedder saves)."""
    state = encoder.state_dict()
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}


def open_clip_to_ldm(encoder, prefix: str) -> dict:
    """HF CLIP text model -> open_clip names: fused qkv, ``positional_embedding``, ``ln_final``,
    and a ``text_projection`` matrix (x @ P, i.e. the transposed Linear weight)."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    projection = state.pop("text_projection.weight", None)
    width = out["token_embedding.weight"].shape[1]
    # SD2's encoder has no projection in diffusers, but its file carries one (ignored on load).
    out["text_projection"] = (projection.T if projection is not None else torch.eye(width)).contiguous()
    state.pop("embeddings.position_ids", None)
    for i in range(encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        attn = src + "self_attn."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{attn}{p}_proj.{kind}") for p in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = state.pop(f"{attn}out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = state.pop(f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = state.pop(f"{src}layer_norm2.{kind}")
            out[f"{dst}mlp.c_fc.{kind}"] = state.pop(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.c_proj.{kind}"] = state.pop(f"{src}mlp.fc2.{kind}")
    if state:
        raise KeyError(f"no open_clip name for {sorted(state)}")
    return {prefix + k: v for k, v in out.items()}


def to_ldm_state_dict(family: str, components: dict) -> dict:
    """The whole checkpoint as the original (CompVis / Stability) single file lays it out."""
    state = unet_to_ldm(components["unet"]) | vae_to_ldm(components["vae"])
    if family == "sd1":
        state |= clip_to_ldm(components["text_encoder"], "cond_stage_model.transformer.")
    elif family == "sd2":
        state |= open_clip_to_ldm(components["text_encoder"], "cond_stage_model.model.")
    else:
        state |= clip_to_ldm(components["text_encoder"], "conditioner.embedders.0.transformer.")
        state |= open_clip_to_ldm(components["text_encoder_2"], "conditioner.embedders.1.model.")
    return {k: v.detach().contiguous() for k, v in state.items()}
