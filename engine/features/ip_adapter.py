"""IP-Adapter references per row of the running batch (Ye et al. 2023, "IP-Adapter"): a field of
the rows' conditioning (:class:`IPRows`) that the SD denoiser hands the UNet's cross-attention.

A reference image goes once, when its job is prepared, through the CLIP image encoder
(``CLIPVisionModelWithProjection``) and the adapter's image projection (diffusers'
``ImageProjection`` for the plain adapters, ``IPAdapterPlusImageProjection`` for Plus, which reads
the encoder's penultimate hidden states): a few image tokens per row. Each cross-attention layer
then adds, per row, ``scale * attention(query, to_k_ip(tokens), to_v_ip(tokens))`` before its
output projection, as diffusers' ``IPAdapterAttnProcessor2_0`` does.

Why our own processor: diffusers' holds one set of image embeddings and one scale per layer for
the whole UNet call (``set_ip_adapter_scale`` writes them into the processors), so every row of a
batch would get the same reference at the same strength. Ours (:class:`RowsIPAttnProcessor`)
reads both from the call (``cross_attention_kwargs["ip_hidden_states"]``, a name diffusers'
``Attention`` passes quietly to every processor that takes it): each row's tokens and a
``[rows, layers]`` table of scales. A row without a reference has zero tokens at scale 0, which
adds exactly nothing, so rows with and without references, with other images and other
strengths, share one UNet call. Without any reference in the batch the processor is diffusers'
``AttnProcessor2_0`` line for line.

The negative prompt's rows carry the reference's unconditional tokens at the same scales, as
diffusers' pipelines give them: the projection of zero embeddings (plain) or of a black image's
hidden states (Plus). Modes (:data:`engine.control_units.IP_ADAPTER_MODULES`): "subject" puts
the reference into every cross-attention layer (the plain IP-Adapter, which carries its subject
and composition); "style" only into the style layer InstantStyle found (Wang et al. 2024; SDXL's
``up_blocks.0.attentions.1``, diffusers' ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``; SD 1.5's
counterpart in its first up block with attention, ``up_blocks.1.attentions.1``), with every
other layer at 0. Per-layer scales are expanded by diffusers' own ``_maybe_expand_lora_scales``, the
function ``set_ip_adapter_scale`` uses, so a spec means what it means there.

Compiled (``engine.compile``), a step with reference rows runs eager (the graphs do not take the
image tokens as inputs yet); steps without them keep their graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.control_units import IP_ADAPTER_MODULES, ControlUnit
from engine.errors import GenerationError

MAX_IP_SCALE = 2.0


def is_ip_unit(unit: ControlUnit) -> bool:
    return unit.module in IP_ADAPTER_MODULES


def cross_attention_names(unet) -> list[str]:
    """The UNet's cross-attention processors' names, in the order IP-Adapter weights number them."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def layer_scales(unet, spec: float | dict) -> list[float]:
    """Each cross-attention layer's scale for a ``set_ip_adapter_scale`` spec (a float: every layer)."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    (expanded,) = _maybe_expand_lora_scales(unet, [spec], default_scale=0.0)
    if not isinstance(expanded, dict):
        return [float(expanded)] * len(cross_attention_names(unet))
    scales = []
    for name in cross_attention_names(unet):
        scale = 0.0
        for prefix, value in expanded.items():  # as set_ip_adapter_scale: the last prefix that matches
            if name.startswith(prefix):
                scale = float(value)
        scales.append(scale)
    return scales


def style_spec(unet) -> dict:
    """InstantStyle's style layer as a ``set_ip_adapter_scale`` spec: the second attention of the
    first up block that has attention (SDXL's ``up_blocks.0``: ``{"up": {"block_0": [0.0, 1.0,
    0.0]}}``, as diffusers' docs give it; SD 1.5's ``up_blocks.1``, its counterpart)."""
    block = next(i for i, up in enumerate(unet.up_blocks) if hasattr(up, "attentions"))
    layers = unet.config.layers_per_block + 1
    return {"up": {f"block_{block}": [1.0 if i == 1 else 0.0 for i in range(layers)]}}


def mode_spec(unet, module: str) -> float | dict:
    """The per-block spec of an IP-Adapter module, at strength 1."""
    return style_spec(unet) if IP_ADAPTER_MODULES[module] == "style" else 1.0


@dataclass(frozen=True)
class IPRows:
    """Every row's image tokens and per-layer scales: prompts' rows first, then negative prompts'."""

    tokens: Tensor  # [2 * rows, tokens, width] in the UNet's dtype
    scales: Tensor  # [2 * rows, layers] float32: 0 where a row has no reference

    @property
    def rows(self) -> int:
        return self.tokens.shape[0] // 2

    @staticmethod
    def cat(parts: list[tuple[IPRows | None, int]]) -> IPRows | None:
        """Join jobs' rows (``(ip or None, rows)`` in row order); a job without a reference gets
        zero tokens at scale 0."""
        like = next((ip for ip, _ in parts if ip is not None), None)
        if like is None:
            return None
        firsts, seconds = [], []
        for ip, rows in parts:
            if ip is None:
                ip = IPRows(
                    like.tokens.new_zeros((2 * rows, *like.tokens.shape[1:])),
                    like.scales.new_zeros((2 * rows, like.scales.shape[1])),
                )
            firsts.append((ip.tokens[:rows], ip.scales[:rows]))
            seconds.append((ip.tokens[rows:], ip.scales[rows:]))
        halves = firsts + seconds
        return IPRows(torch.cat([t for t, _ in halves]), torch.cat([s for _, s in halves]))


class RowsIPAttnProcessor(nn.Module):
    """A cross-attention layer with each row's IP-Adapter tokens at each row's scale (module doc)."""

    def __init__(self, layer: int, to_k_ip: nn.Linear, to_v_ip: nn.Linear) -> None:
        super().__init__()
        self.layer = layer
        self.to_k_ip, self.to_v_ip = to_k_ip, to_v_ip

    def __call__(  # __call__ itself: diffusers' Attention passes the kwargs its signature names
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        ip_hidden_states: IPRows | None = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: Tensor) -> Tensor:
            return t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if ip_hidden_states is not None:
            tokens = ip_hidden_states.tokens
            ip_key, ip_value = heads(self.to_k_ip(tokens)), heads(self.to_v_ip(tokens))
            image = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None)
            image = image.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            scale = ip_hidden_states.scales[:, self.layer].to(image.dtype)
            hidden_states = hidden_states + scale[:, None, None] * image
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class IPAdapter:
    """One IP-Adapter with its image encoder, installed in a UNet (engine/features/ip_loading.py)."""

    def __init__(self, name: str, unet, state_dict: dict[str, dict[str, Tensor]], encoder, processor) -> None:
        self.name, self.encoder, self.processor = name, encoder, processor
        self.device, self.dtype = unet.device, unet.dtype
        # diffusers' own converters, as load_ip_adapter calls them: the projection and each
        # layer's to_k_ip / to_v_ip, from the ``image_proj.*`` and ``ip_adapter.*`` weights.
        self.projection = unet._convert_ip_adapter_image_proj_to_diffusers(
            state_dict["image_proj"], low_cpu_mem_usage=False
        ).to(self.device, self.dtype)
        self.plus = not type(self.projection).__name__ == "ImageProjection"
        converted = unet._convert_ip_adapter_attn_to_diffusers([state_dict], low_cpu_mem_usage=False)
        processors = dict(unet.attn_processors)
        for layer, name_ in enumerate(cross_attention_names(unet)):
            theirs = converted[name_]
            processors[name_] = RowsIPAttnProcessor(layer, theirs.to_k_ip[0], theirs.to_v_ip[0]).to(
                self.device, self.dtype
            )
        unet.set_attn_processor(processors)
        self.unet = unet

    @torch.inference_mode()
    def tokens(self, image) -> tuple[Tensor, Tensor]:
        """The reference's image tokens and the unconditional ones, ``[1, tokens, width]`` each
        (diffusers' ``encode_image`` then the UNet's ``encoder_hid_proj``)."""
        pixels = self.processor(image, return_tensors="pt").pixel_values.to(self.device, self.encoder.dtype)
        if self.plus:
            hidden = self.encoder(pixels, output_hidden_states=True).hidden_states[-2]
            blank = self.encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            hidden = self.encoder(pixels).image_embeds
            blank = torch.zeros_like(hidden)
        project = self.projection
        return project(hidden.to(self.dtype)), project(blank.to(self.dtype))

    def rows(self, unit: ControlUnit, image, rows: int) -> IPRows:
        """One job's rows: every image of it takes the reference at the unit's weight."""
        if not 0 <= unit.weight <= MAX_IP_SCALE:
            raise GenerationError(f"A reference strength must be 0 to {MAX_IP_SCALE:g}.")
        positive, negative = self.tokens(image)
        per_layer = torch.tensor(layer_scales(self.unet, mode_spec(self.unet, unit.module)), dtype=torch.float32)
        scales = (per_layer * unit.weight)[None].expand(2 * rows, -1).to(self.device)
        return IPRows(torch.cat([positive.expand(rows, -1, -1), negative.expand(rows, -1, -1)]), scales)


def ip_inputs(ip: IPRows | None) -> dict[str, Any]:
    """The UNet call's keyword arguments for the rows' references (none without one)."""
    return {} if ip is None else {"cross_attention_kwargs": {"ip_hidden_states": ip}}
