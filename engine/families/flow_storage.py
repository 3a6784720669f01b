"""Where a flow model's weights live: float8 storage, and text encoders off the device.

Flux's transformer has 11.9 B parameters (23.8 GB in bf16), T5-XXL 4.8 B. Two settings fit them
on the GPUs owners have:

- ``model.weights = "float8_e4m3fn"`` stores the transformer's and T5's Linear (and embedding)
  weights in float8 e4m3 and upcasts each layer to the compute dtype (``engine.dtype``) just
  before it runs, as Forge and ComfyUI do: diffusers' layerwise casting hooks
  (:func:`diffusers.hooks.apply_layerwise_casting`, what ``ModelMixin.enable_layerwise_casting``
  calls), not a cast of our own. ``"auto"`` keeps an fp8 file in fp8 (an owner who downloads
  flux1-dev-fp8 has a GPU sized for it) and everything else in the compute dtype; ``"compute"``
  upcasts even an fp8 file. Kept in the compute dtype: position and patch embeddings, the first
  and last projections and the final norm (diffusers' defaults); unlike diffusers' class defaults
  for Flux and SD 3.5, each block's modulation Linear (``norm1.linear``...) is stored in fp8 too,
  as Forge's and ComfyUI's fp8 files store it: in Flux those are 3.2 B parameters, and its
  transformer takes 11.9 GB instead of 15.2 GB (23.8 GB in bf16). In T5 the feed-forward output
  ``wo`` and the relative position bias stay in the compute dtype: transformers' T5 keeps ``wo``
  out of half precision and casts ``wo``'s input to its weight's dtype, which would be fp8.
- ``engine.text_encoders = "cpu"`` keeps the text encoders on the CPU (they run once per prompt,
  and prompts are cached): the prompt encoders move token ids to the encoder's device and the
  results to the model's.
"""

from __future__ import annotations

import torch

from engine.config.model_settings import WEIGHT_STORAGES
from engine.config.settings import TEXT_ENCODER_PLACES

__all__ = ["TEXT_ENCODER_PLACES", "WEIGHT_STORAGES", "store_in_fp8", "stored_in_fp8", "stores_fp8", "weight_bytes"]
FP8 = torch.float8_e4m3fn
#: Transformer modules kept in the compute dtype (see the module doc).
TRANSFORMER_KEEP = ("pos_embed", "patch_embed", "norm_out", "^proj_in$", "^proj_out$")
T5_KEEP = ("norm", r"\.wo$", "relative_attention_bias")


def stores_fp8(weights: str, fp8_file: bool) -> bool:
    """Whether ``model.weights`` asks for float8 storage of a model (from an fp8 file or not)."""
    return weights == "float8_e4m3fn" or (weights == "auto" and fp8_file)


def store_in_fp8(transformer: torch.nn.Module, text_encoders: list, compute_dtype: torch.dtype) -> None:
    """The transformer's and T5's weights in float8, upcast per layer to ``compute_dtype``
    (call before moving them to the device, so that only fp8 weights travel)."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(transformer, FP8, compute_dtype, skip_modules_pattern=TRANSFORMER_KEEP)
    for encoder in text_encoders:
        if encoder.config.model_type == "t5":
            apply_layerwise_casting(encoder, FP8, compute_dtype, skip_modules_pattern=T5_KEEP)


def stored_in_fp8(module: torch.nn.Module) -> bool:
    """Whether ``module`` has layers stored in float8 by :func:`store_in_fp8`. Such a network runs
    eager: diffusers' hooks cast each layer's parameters in place before and after it runs, which
    ``torch.compile(fullgraph=True)`` cannot trace (dynamo: "Attempted to use torch.nn.Parameter()
    constructor")."""
    return any(
        getattr(m, "_diffusers_hook", None) and m._diffusers_hook.get_hook("layerwise_casting")
        for m in module.modules()
    )


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers take, as stored."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
