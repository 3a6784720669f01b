"""Tiny random-weight Flux.1 (dev, schnell) and Stable Diffusion 3.5 models for fast CPU tests.

The components are the real diffusers/transformers classes with small configs that keep each
family's structure: Flux's double- and single-stream blocks, 2x2 latent packing and (dev) guidance
embedding; SD 3.5's joint blocks with RMS qk-norm; CLIP-L and CLIP-G (pooled outputs concatenated)
and T5 (padded wider than the CLIP hiddens, as 4096 > 768 + 1280 in the real model); a 16-channel
VAE whose latent cell is 8x8 pixels. Tokenizers are built offline: the real CLIP tokenizer
(:func:`engine.families.sd.tokenizer.clip_tokenizer`) and a small Unigram T5 tokenizer (:func:`t5_tokenizer`).

Choices that matter to anyone comparing formats:

* SD 3.5's CLIP-L and CLIP-G have different widths (32, 64): diffusers' single-file loader tells
  them apart by width only, as for SDXL (tests/tinymodel.py).
* SD 3.5's CLIP-L text projection is the identity: SAI's reference code uses CLIP-L's pooled
  output unprojected, and diffusers' single-file loader sets ``torch.eye`` for it, so only an
  identity makes the folder and the single file the same model.

Formats. Each single file gets, beside it with the same stem, a weight-less diffusers folder
(model_index.json, the component configs, the tokenizers) that ``from_single_file(path,
config=folder)`` reads offline, as tests/tinymodel.py does for SD:

* :func:`save_flux_folder`, :func:`save_sd3_folder` -- ``save_pretrained`` layouts;
* :func:`save_flux_transformer_file` -- the transformer alone in BFL's names (flux1-dev.safetensors),
  or under ``model.diffusion_model.`` as ComfyUI saves diffusion models;
* :func:`save_flux_checkpoint_file` -- ComfyUI's all-in-one (transformer, ``vae.``, CLIP-L, T5);
* :func:`save_sd3_checkpoint_file` -- SAI's single file (MMDiT, ``first_stage_model.``, encoders);
* ``dtype=torch.float8_e4m3fn`` on each of them: Linear weights stored in fp8, as Comfy/Forge files.

What diffusers 0.42 (with transformers 5) makes of them, found by tests/test_tinyflow.py:

* Its Flux converter cuts single blocks at FLUX.1's width (3072) whatever the file, so tiny BFL
  files load only within :func:`tiny_flux_single_files`; real files are unaffected.
* From a file without ``encoder.embed_tokens.weight`` (tied to ``shared.weight``; SAI's and
  ComfyUI's T5 have ``shared`` only) its T5 keeps ``encoder.embed_tokens`` on the meta device
  until ``tie_weights()`` is called: transformers 5 gives the stack its own embedding.
* A model without T5 loads only with ``text_encoder_3=None, tokenizer_3=None`` passed, from a folder
  (ValueError otherwise) or a single file (TypeError inside diffusers otherwise).
* Its model-type detection recognises tiny Flux files (by key names) but not tiny SD 3.5 files
  (it checks FLUX/SD3 widths), so ``config=`` is always passed.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from engine.torch_builds import torchvision_importable

torchvision_importable()  # before diffusers imports it (see engine/torch_builds.py)

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.loaders import single_file_utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from engine.families.sd.tokenizer import EOS, clip_tokenizer  # noqa: E402
from tinyflow_keys import clip_keys, flux_to_bfl, sd3_to_sai, t5_keys, to_fp8, vae_keys  # noqa: E402
from tinymodel import clip_text_encoder  # noqa: E402

FLUX_TEXT_WIDTH = 32  # CLIP-L: pooled -> the transformer's pooled_projection_dim
FLUX_T5_WIDTH = 32  # T5 -> joint_attention_dim
SD3_CLIP_L_WIDTH = 32
SD3_CLIP_G_WIDTH = 64  # must differ from CLIP-L's (see the module doc)
SD3_T5_WIDTH = 128  # wider than the CLIP hiddens together (96), which the pipeline pads to it
T5_MAX_LENGTH = 512  # the real tokenizers' model_max_length; tests pass max_sequence_length=16..32
T5_WORDS = (
    "a an the of and with in on at by to is for from photo painting drawing portrait landscape "
    "cat dog bird horse man woman child red blue green yellow black white city forest sky night "
    "light tree house car mountain river sea sun moon star flower"
).split()


# ---------------------------------------------------------------------------- building


def t5_tokenizer() -> T5TokenizerFast:
    """A small T5 tokenizer: a Unigram model over ``▁word`` pieces and characters, built offline.

    T5's layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no sentinel ids; ``</s>`` ends each text.
    """
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars += [c.upper() for c in chars] + list("0123456789.,!?'-()")
    pieces = dict.fromkeys(["▁" + w for w in T5_WORDS] + ["▁" + c for c in chars] + ["▁"] + chars)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -3.0 if len(p) > 2 else -6.0) for p in pieces]  # whole words beat spelling out
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tokenizer.decoder = decoders.Metaspace(**metaspace)
    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "tokenizer.json"
        tokenizer.save(str(file))
        return T5TokenizerFast(
            tokenizer_file=str(file),
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
            extra_ids=0,
            model_max_length=T5_MAX_LENGTH,
        )


def _t5(d_model: int, vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL (wi_0, wi_1)
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def _vae(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=32,
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def flux_scheduler(guidance_embeds: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config (dynamic shift from the image's token count), or schnell's."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0 if guidance_embeds else 1.0,
        use_dynamic_shifting=guidance_embeds,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _seeded(seed: int, build, *args, **kwargs):
    """A component from its own seed, so that one's options (a guidance embedding, no T5) leave
    the others' weights alone: dev and schnell share their VAE and text encoders, as the real
    ones do, and SD 3.5 without T5 is SD 3.5 with T5 minus T5."""
    torch.manual_seed(seed)
    return build(*args, **kwargs).eval()


def build_flux_components(guidance_embeds: bool = True, seed: int = 0) -> dict:
    """Random-weight FluxPipeline components: dev (guidance embedding) or schnell (none)."""
    tokenizer_2 = t5_tokenizer()
    transformer = _seeded(
        seed,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_T5_WIDTH,
        pooled_projection_dim=FLUX_TEXT_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    return {
        "transformer": transformer,
        "text_encoder": _seeded(seed + 1, clip_text_encoder, FLUX_TEXT_WIDTH, "quick_gelu", with_projection=False),
        "tokenizer": clip_tokenizer(EOS),
        "text_encoder_2": _seeded(seed + 2, _t5, FLUX_T5_WIDTH, len(tokenizer_2)),
        "tokenizer_2": tokenizer_2,
        "vae": _seeded(seed + 3, _vae, shift_factor=0.1159, scaling_factor=0.3611),
        "scheduler": flux_scheduler(guidance_embeds),
    }


def build_sd3_components(with_t5: bool = True, seed: int = 0) -> dict:
    """Random-weight StableDiffusion3Pipeline components (SD 3.5's shape); T5 optional."""
    transformer = _seeded(
        seed,
        SD3Transformer2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=SD3_T5_WIDTH,
        caption_projection_dim=32,  # = heads x head dim
        pooled_projection_dim=SD3_CLIP_L_WIDTH + SD3_CLIP_G_WIDTH,
        out_channels=16,
        pos_embed_max_size=32,  # up to 32 x 2 x 8 = 512 px
        qk_norm="rms_norm",
    )
    clip_l = _seeded(seed + 1, clip_text_encoder, SD3_CLIP_L_WIDTH, "quick_gelu", with_projection=True)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(SD3_CLIP_L_WIDTH))
    tokenizer_3 = t5_tokenizer() if with_t5 else None
    return {
        "transformer": transformer,
        "text_encoder": clip_l,
        "tokenizer": clip_tokenizer(EOS),
        "text_encoder_2": _seeded(seed + 2, clip_text_encoder, SD3_CLIP_G_WIDTH, "gelu", with_projection=True),
        "tokenizer_2": clip_tokenizer("!"),
        "text_encoder_3": _seeded(seed + 3, _t5, SD3_T5_WIDTH, len(tokenizer_3)) if with_t5 else None,
        "tokenizer_3": tokenizer_3,
        "vae": _seeded(seed + 4, _vae, shift_factor=0.0609, scaling_factor=1.5305),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


# ---------------------------------------------------------------------------- diffusers folders


def save_flux_folder(path: str | Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Write a tiny Flux (dev, or schnell without guidance) as a diffusers folder."""
    FluxPipeline(**build_flux_components(guidance_embeds, seed)).save_pretrained(path)
    return Path(path)


def save_sd3_folder(path: str | Path, with_t5: bool = True, seed: int = 0) -> Path:
    """Write a tiny SD 3.5 as a diffusers folder (``text_encoder_3``: null without T5)."""
    StableDiffusion3Pipeline(**build_sd3_components(with_t5, seed)).save_pretrained(path)
    return Path(path)


# ---------------------------------------------------------------------------- single files


def _write(path: str | Path, state: dict, pipe) -> Path:
    """The file, and beside it (``tiny.safetensors`` -> ``tiny/``) a weight-less diffusers folder:
    model_index.json, every component's config and the tokenizers, as tests/tinymodel.py does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, path)
    config_dir = path.with_suffix("")
    pipe.save_config(config_dir)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if name.startswith("tokenizer"):
            component.save_pretrained(config_dir / name)
        else:  # diffusers objects have save_config; transformers models keep theirs on .config
            saver = getattr(component, "save_config", None) or component.config.save_pretrained
            saver(config_dir / name)
    return path


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def save_flux_transformer_file(
    path: str | Path,
    guidance_embeds: bool = True,
    prefix: str = "",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Path:
    """Flux's transformer alone in BFL's names: ``prefix=""`` as BFL's flux1-dev.safetensors,
    ``"model.diffusion_model."`` as ComfyUI saves a diffusion model; ``dtype=torch.float8_e4m3fn``
    as an fp8 file. Its text encoders and VAE come from a folder (:func:`save_flux_folder`)."""
    components = build_flux_components(guidance_embeds, seed)
    state = _prefixed(prefix, to_fp8(flux_to_bfl(components["transformer"]), dtype))
    return _write(path, state, FluxPipeline(**components))


def save_flux_checkpoint_file(
    path: str | Path,
    guidance_embeds: bool = True,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    text_encoders: bool = True,
) -> Path:
    """ComfyUI's all-in-one Flux checkpoint (its Flux ``vae_key_prefix`` and
    ``text_encoder_key_prefix``): ``model.diffusion_model.`` in BFL's names, ``vae.`` in LDM
    names, ``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.transformer.``."""
    components = build_flux_components(guidance_embeds, seed)
    state = _prefixed("model.diffusion_model.", to_fp8(flux_to_bfl(components["transformer"]), dtype))
    state |= vae_keys(components["vae"], "vae.")
    if text_encoders:  # Flux's CLIP-L is a CLIPTextModel: pooled, with no projection to carry
        state |= clip_keys(components["text_encoder"], "text_encoders.clip_l.transformer.")
        state |= t5_keys(components["text_encoder_2"], "text_encoders.t5xxl.transformer.")
    return _write(path, state, FluxPipeline(**components))


def save_sd3_checkpoint_file(
    path: str | Path,
    with_t5: bool = True,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    text_encoders: bool = True,
) -> Path:
    """SD 3.5 in SAI's single-file layout: ``model.diffusion_model.`` in MMDiT names and
    ``first_stage_model.`` (LDM VAE), with ``text_encoders.clip_l/clip_g/t5xxl.transformer.`` as
    the ``*_incl_clips_t5xxl*`` files carry them; ``text_encoders=False`` is the layout of
    sd3.5_large.safetensors, whose encoders ship apart."""
    components = build_sd3_components(with_t5, seed)
    state = _prefixed("model.diffusion_model.", to_fp8(sd3_to_sai(components["transformer"]), dtype))
    state |= vae_keys(components["vae"], "first_stage_model.")
    if text_encoders:  # CLIP-L's pooled output is used unprojected: no projection in the file
        state |= clip_keys(components["text_encoder"], "text_encoders.clip_l.transformer.", projection=False)
        state |= clip_keys(components["text_encoder_2"], "text_encoders.clip_g.transformer.")
        if with_t5:
            state |= t5_keys(components["text_encoder_3"], "text_encoders.t5xxl.transformer.")
    return _write(path, state, StableDiffusion3Pipeline(**components))


class _FluxSizedSplits:
    """``torch`` for diffusers' single_file_utils, except that ``split`` scales FLUX.1's sizes.

    ``convert_flux_transformer_checkpoint_to_diffusers`` cuts each single block's ``linear1`` at
    ``inner_dim = 3072`` (q, k, v) and ``4 * 3072`` (MLP) whatever the checkpoint; a tiny model
    keeps the 1:1:1:4 ratios, so the same cut scaled to the tensor is the converter's intent."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def split(tensor, sizes, dim=0):
        if isinstance(sizes, (list, tuple)) and sum(sizes) != tensor.shape[dim]:
            sizes = [size * tensor.shape[dim] // sum(sizes) for size in sizes]
        return torch.split(tensor, sizes, dim)


@contextmanager
def tiny_flux_single_files():
    """Within it, diffusers' own Flux converter loads tiny BFL-layout files (see above)."""
    with mock.patch.object(single_file_utils, "torch", _FluxSizedSplits()):
        yield
