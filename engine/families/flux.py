"""Flux.1 (dev and schnell): CLIP-L's pooled output and T5's tokens guide a flow transformer.

Read from diffusers' ``FluxPipeline``, which the tests compare with on the same weights and noise:

- prompt: CLIP-L's pooled output (77 tokens) and T5's last hidden state, padded to
  :data:`MAX_T5_TOKENS` (or the tokenizer's own limit, if lower); text position ids are zeros;
- latents are 16 channels at 1/8 of the image, packed 2x2 into tokens of 64 for the transformer
  and unpacked after it (so sizes are multiples of 16), with the image ids of each token's
  (row, column); the batch keeps them unpacked, so the samplers and blends work on them as on
  any latents;
- guidance: dev takes its guidance scale as an input of the network (a guidance embedding), one
  value per row, so rows with different guidance share one call; schnell takes none. There is no
  negative prompt: one row per image (the bot refuses a member's negative prompt on Flux);
- timestep: the pipeline's ``sigma * 1000 / 1000``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.families.flow import FlowNoise, FlowShift, flux_sigmas
from engine.families.flow_parts import FlowDenoiser, PromptCache, clip_ids, plain_prompt, t5_ids
from engine.features.lora_slots import LoraRows

#: T5's sequence length (FluxPipeline's default; a tokenizer with a lower limit lowers it).
MAX_T5_TOKENS = 512


@dataclass(frozen=True)
class FluxPrompt:
    hidden: Tensor  # [tokens, width]: T5's last hidden state
    pooled: Tensor  # [width]: CLIP-L's pooled output


@dataclass(frozen=True)
class FluxConditioning:
    """Per-row inputs of the Flux transformer: one row per image."""

    embeds: Tensor  # [rows, tokens, width]
    pooled: Tensor  # [rows, width]
    guidance: Tensor  # [rows] float32: the distilled guidance scale (unused by schnell)
    image: None = None  # no inpainting variant
    mask: None = None  # every row's T5 tokens are padded to the same length: nothing to mask
    lora: LoraRows | None = None  # each row's LoRA slots and weights (engine.features.lora_slots)

    @property
    def rows(self) -> int:
        return self.guidance.shape[0]

    @staticmethod
    def cat(parts: list[FluxConditioning]) -> FluxConditioning:
        return FluxConditioning(
            embeds=torch.cat([p.embeds for p in parts]),
            pooled=torch.cat([p.pooled for p in parts]),
            guidance=torch.cat([p.guidance for p in parts]),
            lora=LoraRows.join([(p.lora, p.rows) for p in parts], pairs=1),
        )


class FluxPrompts:
    """CLIP-L and T5 over plain prompts, cached per prompt."""

    def __init__(self, text_encoders: list, tokenizers: list, device: torch.device, dtype: torch.dtype) -> None:
        (self.clip, self.t5), (self.clip_tokenizer, self.t5_tokenizer) = text_encoders, tokenizers
        self.device, self.dtype = device, dtype
        self.t5_tokens = min(MAX_T5_TOKENS, int(self.t5_tokenizer.model_max_length))
        self._cache = PromptCache(self._encode)
        self.variant: Hashable = ()  # the LoRA set in use (Pipeline.use_loras): part of the cache key

    def __call__(self, prompt: str) -> FluxPrompt:
        return self._cache(plain_prompt(prompt), self.variant)

    @torch.inference_mode()
    def _encode(self, prompt: str) -> FluxPrompt:
        # The encoders may run on the CPU (engine.text_encoders): ids go to theirs, results to the model's.
        clip_in = clip_ids(self.clip_tokenizer, prompt, self.clip.device)
        pooled = self.clip(clip_in, output_hidden_states=False).pooler_output
        t5_in = t5_ids(self.t5_tokenizer, prompt, self.t5_tokens, self.t5.device)
        hidden = self.t5(t5_in, output_hidden_states=False)[0]
        return FluxPrompt(hidden=hidden[0].to(self.device, self.dtype), pooled=pooled[0].to(self.device, self.dtype))

    def conditioning(self, prompt: str, negative_prompt: str, *, rows: int, guidance: float, **_) -> FluxConditioning:
        """One job's rows. ``negative_prompt`` has no effect on Flux (checked before: see the module doc)."""
        encoded = self(prompt)
        return FluxConditioning(
            embeds=encoded.hidden[None].expand(rows, -1, -1),
            pooled=encoded.pooled[None].expand(rows, -1),
            guidance=torch.full((rows,), guidance, device=self.device, dtype=torch.float32),
        )


def flux_noise(scheduler_config: dict, latent_scale: int = 8) -> FlowNoise:
    return FlowNoise(FlowShift.from_config(scheduler_config), flux_sigmas, latent_scale=latent_scale, patch=2)


def pack(latents: Tensor) -> Tensor:
    """[n, C, h, w] -> [n, h/2 * w/2, 4C] (FluxPipeline's ``_pack_latents``)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack` (FluxPipeline's ``_unpack_latents``)."""
    n, _, channels = tokens.shape
    return tokens.view(n, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, channels // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Each packed token's (0, row, column) (FluxPipeline's ``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxDenoiser(FlowDenoiser):
    family = "flux"
    pairs = 1  # no negative-prompt rows
    shared_inputs = frozenset({"txt_ids", "img_ids"})

    def __init__(self, transformer, noise: FlowNoise) -> None:
        super().__init__(transformer, noise)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self._ids: dict[tuple, tuple[Tensor, Tensor]] = {}  # (h, w, text tokens) -> (image ids, text ids)

    def ids(self, h: int, w: int, text_tokens: int) -> tuple[Tensor, Tensor]:
        key = (h, w, text_tokens)
        if key not in self._ids:
            text = torch.zeros(text_tokens, 3, device=self.device, dtype=self.dtype)
            self._ids[key] = image_ids(h, w, self.device, self.dtype), text
        return self._ids[key]

    def velocity(self, x: Tensor, t: Tensor, cond: FluxConditioning) -> Tensor:
        n, _, h, w = x.shape
        img, txt = self.ids(h, w, cond.embeds.shape[1])
        packed = pack(x.to(self.dtype))
        inputs = dict(
            hidden_states=packed,
            timestep=t.to(self.dtype) / 1000,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=txt,
            img_ids=img,
        )
        if self.guidance_embeds:
            inputs["guidance"] = cond.guidance
        out, _ = self.run(n, packed, cond, inputs)
        return unpack(out[:n].float(), h, w)
