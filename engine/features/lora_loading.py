"""One LoRA file into a loaded model as a named peft adapter, the way each family's diffusers
pipeline loads it (:class:`engine.features.lora.LoraLibrary` decides when, and which adapters are on).

Each family uses its own diffusers pipeline's converter and loaders, so a file loads here as
``load_lora_weights`` loads it into that pipeline (the tests compare the latents):

- SD 1.x/2.x/XL: ``StableDiffusion(XL)Pipeline.lora_state_dict`` reads kohya / AUTOMATIC1111
  files (``lora_unet_*``, ``lora_te_*``, SDXL's ``lora_te1_*``/``lora_te2_*``) and diffusers'
  (``unet.*``, ``text_encoder.*``); the UNet and each CLIP get the adapter.
- Flux.1: ``FluxPipeline.lora_state_dict`` reads kohya's (``lora_unet_double_blocks_*``,
  ``lora_unet_single_blocks_*``, ``lora_te1_*`` for CLIP-L), ComfyUI's (``diffusion_model.*``),
  XLabs' and diffusers' (``transformer.*``, ``text_encoder.*``) layouts; the transformer and CLIP-L
  get the adapter (diffusers drops T5 weights, so do we). Where diffusers' kohya converter loses
  layers, we keep them as kohya, ComfyUI and Forge apply them (:data:`FLUX_UNPREFIXED`,
  :func:`_final_layer_scaled`); a dev LoRA's guidance layers are left out on schnell.
- SD 3.5: ``StableDiffusion3Pipeline.lora_state_dict`` converts nothing: diffusers' layout only
  (``transformer.*``, ``text_encoder.*`` for CLIP-L, ``text_encoder_2.*`` for CLIP-G). A kohya or
  ComfyUI SD 3.5 file is refused by name, not loaded as nothing.

diffusers only warns about weights that match no layer of the model, and loads the rest: a
file for another family, a Flux Control LoRA (it replaces norms and widens the input layer) or a
layout nobody converts would change part of the model, or nothing, without a word. So a file
whose layer names betray another family is refused on every family (:data:`TELLTALES`), and on
the flow families every converted weight must name a layer of the transformer or belong to a
text encoder that takes LoRAs (:func:`_check_fits`), or the file is refused with the layer it
names. On layers stored in float8 the adapters stay in the compute dtype
(:func:`_adapters_in_compute_dtype`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.errors import GenerationError
from engine.families import traits

if TYPE_CHECKING:
    from engine.families.loading import LoadedModel

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: Adds the adapter named ``adapter`` to the model's modules, appending each to ``holders`` before
#: loading into it (so a half-done load can be undone).
Loader = Callable[["LoadedModel", dict, str, str, list], None]


def load_adapter(model: LoadedModel, path: Path, adapter: str, holders: list[torch.nn.Module]) -> None:
    """One LoRA file into the model's denoising network and text encoder(s) as adapter ``adapter``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.families.loading import progress_bars

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise GenerationError(f"LoRA file {path.name} is damaged or not a .safetensors file ({e}).") from e
    with progress_bars(False), warnings.catch_warnings(), _quiet(logging.getLogger("transformers.integrations.peft")):
        # peft warns on every adapter after the first, and transformers lists the other adapters'
        # weights as "missing" from this one: several adapters is what we want (the tests check
        # that each adapter holds its file's weights).
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        with _adapters_in_compute_dtype(model):
            LOADERS[model.info.family](model, tensors, path.stem, adapter, holders)


# ---------------------------------------------------------------------------- SD 1.x, 2.x, XL


def _load_sd(model: LoadedModel, tensors: dict, name: str, adapter: str, holders: list) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    _refuse_foreign(model, tensors, name)
    sdxl = model.info.family == "sdxl"
    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {"unet_config": model.unet.config} if sdxl else {}
    state, alphas = loader.lora_state_dict(tensors, **extra)
    if any(k.startswith("unet.") for k in state):
        holders.append(model.unet)  # before loading: a half-done load is cleaned up too
        model.unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name=adapter)
    prefixes = ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]
    for encoder, prefix in zip(model.text_encoders, prefixes, strict=False):
        if not any(name.startswith("text_model.") for name, _ in encoder.named_parameters()):
            # transformers 5's CLIP text models dropped the ``text_model.`` level that
            # diffusers' converted names still carry: unmatched, peft would leave the adapter
            # at its random initial weights (only a load report says so).
            state, alphas = (
                _drop_level(state, f"{prefix}.text_model."),
                _drop_level(alphas, f"{prefix}.text_model."),
            )
        if any(k.startswith(prefix + ".") for k in state):
            holders.append(encoder)
            loader.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix, adapter_name=adapter)


def _drop_level(tensors: dict | None, prefix: str) -> dict | None:
    """``prefix + rest`` -> ``prefix`` minus its last level ``+ rest``."""
    if tensors is None:
        return None
    short = prefix.removesuffix("text_model.")
    return {(short + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()}


# ---------------------------------------------------------------------------- Flux.1, SD 3.5


def _load_flux(model: LoadedModel, tensors: dict, name: str, adapter: str, holders: list) -> None:
    """As ``FluxLoraLoaderMixin.load_lora_weights``: the transformer, then CLIP-L (not T5)."""
    from diffusers import FluxPipeline

    _refuse_foreign(model, tensors, name)
    state, alphas = FluxPipeline.lora_state_dict(_final_layer_scaled(tensors), return_alphas=True)
    state = _flux_layers(state, guidance=model.unet.config.guidance_embeds)
    _check_fits(model, state, name, encoders=("text_encoder",))
    if _has(state, "transformer"):
        holders.append(model.unet)  # before loading: a half-done load is cleaned up too
        FluxPipeline.load_lora_into_transformer(state, alphas, model.unet, adapter_name=adapter)
    if _has(state, "text_encoder"):
        holders.append(model.text_encoders[0])
        FluxPipeline.load_lora_into_text_encoder(
            state, alphas, model.text_encoders[0], prefix="text_encoder", adapter_name=adapter
        )


#: Layers that diffusers' kohya converter names without the ``transformer.`` its loader keeps, so
#: that diffusers drops them with a warning (0.42 and its main branch); kohya, ComfyUI and Forge
#: apply them (``lora_unet_img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``,
#: ``final_layer``), and so do we.
FLUX_UNPREFIXED = ("time_text_embed.", "x_embedder.", "context_embedder.", "norm_out.", "proj_out.")


def _flux_layers(state: dict, guidance: bool) -> dict:
    """The converted weights under ``transformer.`` where diffusers left them out, less the guidance
    embedding's on a model without one (a Flux dev LoRA on schnell, as ComfyUI skips them)."""
    out = {}
    for key, value in state.items():
        key = "transformer." + key if key.startswith(FLUX_UNPREFIXED) else key
        if guidance or ".guidance_embedder." not in key:
            out[key] = value
    return out


def _final_layer_scaled(tensors: dict) -> dict:
    """kohya's final-layer weights with their ``alpha / rank`` in the down weights: diffusers'
    converter drops those alphas unapplied (it scales every other layer by them)."""
    out = dict(tensors)
    final = ("lora_unet_final_layer_", "diffusion_model.final_layer.")  # kohya's, ComfyUI's
    for key in [k for k in tensors if k.startswith(final) and k.endswith(".alpha")]:
        down = key.removesuffix(".alpha") + ".lora_down.weight"
        if down in out:
            out[down] = out[down] * (out.pop(key).item() / out[down].shape[0])
    return out


def _load_sd3(model: LoadedModel, tensors: dict, name: str, adapter: str, holders: list) -> None:
    """As ``SD3LoraLoaderMixin.load_lora_weights``: the transformer, CLIP-L and CLIP-G (not T5)."""
    from diffusers import StableDiffusion3Pipeline

    _refuse_foreign(model, tensors, name)
    if any(k.startswith(UNCONVERTED_SD3) for k in tensors):
        raise GenerationError(
            f"LoRA {name!r} is in kohya's or ComfyUI's key layout, which diffusers reads for Flux.1 and "
            "SD 1.x/XL but not for SD 3.5: use the LoRA in diffusers' layout (transformer.*.lora_A.weight), "
            "as diffusers, SimpleTuner and ai-toolkit save it."
        )
    state = StableDiffusion3Pipeline.lora_state_dict(tensors)
    _check_fits(model, state, name, encoders=("text_encoder", "text_encoder_2"))
    if _has(state, "transformer"):
        holders.append(model.unet)
        StableDiffusion3Pipeline.load_lora_into_transformer(state, model.unet, adapter_name=adapter)
    for encoder, prefix in zip(model.text_encoders[:2], ("text_encoder", "text_encoder_2"), strict=True):
        if _has(state, prefix):
            holders.append(encoder)
            StableDiffusion3Pipeline.load_lora_into_text_encoder(
                state, None, encoder, prefix=prefix, adapter_name=adapter
            )


#: Key prefixes of SD 3.5 LoRA layouts that diffusers' SD 3.5 loader does not convert.
UNCONVERTED_SD3 = ("lora_unet_", "lora_te", "lora_transformer_", "diffusion_model.", "model.diffusion_model.")
#: (the families a LoRA fits, what it is made for, the parts of weight names that tell): layer names
#: that only one kind of network has, in any layout (diffusers', LDM's, BFL's and MMDiT's as kohya
#: and ComfyUI write them; a leading "^" must start the name). A LoRA naming them is refused on
#: the other families before diffusers reads it, since diffusers would apply the part that
#: happens to match (a Flux LoRA's CLIP weights on SD 1.x) and only warn about the rest.
TELLTALES = (
    (
        ("sd1", "sd2", "sdxl"),
        "SD 1.x, 2.x or XL (its weights change a UNet)",
        ("down_blocks", "up_blocks", "input_blocks", "^unet."),
    ),
    (("flux",), "Flux.1", ("double_blocks", "single_blocks", "single_transformer_blocks")),
    (("sd3",), "SD 3.5", ("joint_blocks",)),
    (("flux", "sd3"), "Flux.1 or SD 3.5 (its weights change a transformer)", ("^transformer.",)),
)


def _has(state: dict, prefix: str) -> bool:
    return any(k.startswith(prefix + ".") for k in state)


def _refuse_foreign(model: LoadedModel, tensors: dict, name: str) -> None:
    for families, made_for, parts in TELLTALES:
        if model.info.family not in families and any(_tells(key, part) for key in tensors for part in parts):
            raise _unfit(model, name, f"it is made for {made_for}")


def _tells(key: str, part: str) -> bool:
    return key.startswith(part[1:]) if part.startswith("^") else part in key


def _check_fits(model: LoadedModel, state: dict, name: str, encoders: tuple[str, ...]) -> None:
    """Every converted weight names a layer of the transformer, or belongs to a text encoder that
    takes LoRAs (whose names diffusers' text-encoder loader maps itself)."""
    layers = {layer for layer, _ in model.unet.named_modules()}
    for key in state:
        part, _, rest = key.partition(".")
        if part not in encoders and (part != "transformer" or rest.split(".lora")[0] not in layers):
            label = traits(model.info.family).label
            raise _unfit(model, name, f"it changes {key.split('.lora')[0]!r}, which a {label} model does not have")


def _unfit(model: LoadedModel, name: str, why: str) -> GenerationError:
    label = traits(model.info.family).label
    return GenerationError(
        f"LoRA {name!r} does not fit model {model.info.name!r}: {why}. Use a LoRA made for {label} models."
    )


@contextlib.contextmanager
def _adapters_in_compute_dtype(model: LoadedModel) -> Iterator[None]:
    """peft makes an adapter in its base layer's dtype, so on a layer stored in float8
    (``model.weights``, :mod:`engine.families.flow_storage`) the file's weights would be rounded to
    fp8 and could not run (fp8 has no matmul of its own). peft takes a layer's ``compute_dtype``
    instead where it has one (as for bitsandbytes' layers): given the model's during the load, the
    adapters hold the file's weights in the compute dtype, beside the fp8 layers they change."""
    networks = (model.unet, *model.text_encoders)
    stored_fp8 = [layer for network in networks for layer in network.modules() if _stored_in_fp8(layer)]
    for layer in stored_fp8:
        layer.compute_dtype = model.dtype
    try:
        yield
    finally:
        for layer in stored_fp8:
            del layer.compute_dtype


def _stored_in_fp8(layer: torch.nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return isinstance(layer, torch.nn.Linear) and weight.dtype in FP8_DTYPES and not hasattr(layer, "compute_dtype")


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


#: Family -> how a LoRA file is loaded into a model of it.
LOADERS: dict[str, Loader] = {
    "sd1": _load_sd,
    "sd2": _load_sd,
    "sdxl": _load_sd,
    "flux": _load_flux,
    "sd3": _load_sd3,
}
