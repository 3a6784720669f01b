"""Stable Diffusion 3.5 (Medium, Large, Large Turbo): three text encoders guide a flow transformer
(MMDiT) with classifier-free guidance.

Read from diffusers' ``StableDiffusion3Pipeline``, which the tests compare with on the same
weights and noise:

- prompt: CLIP-L's and CLIP-G's penultimate hidden states side by side, zero-padded to T5's
  width, then T5's last hidden state after them along the tokens (:data:`MAX_T5_TOKENS`); the
  pooled input is the two CLIPs' projected outputs side by side. Without T5 (a checkpoint or a
  setting that leaves it out, as ``text_encoder_3=None`` in diffusers) T5's part is zeros;
- latents are 16 channels at 1/8 of the image (the transformer patches them itself, 2x2, so
  sizes are multiples of 16);
- guidance: a prompt row and a negative-prompt row per image, mixed with each row's own scale
  (the batch's CFG layout, as for the SD families); a row at a scale of 1 or less takes its
  prompt's prediction alone, as the pipeline does (SD 3.5 Large Turbo runs at 0); the timestep is
  ``sigma * 1000``.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from engine.families.flow import FlowNoise, FlowShift, sd3_sigmas
from engine.families.flow_parts import FlowDenoiser, PromptCache, clip_ids, plain_prompt, t5_ids
from engine.families.sd.denoiser import Conditioning
from engine.sampling.sampler_steps import rows

#: T5's sequence length (StableDiffusion3Pipeline's default).
MAX_T5_TOKENS = 256


class SD3Prompts:
    """CLIP-L, CLIP-G and (optionally) T5 over plain prompts, cached per prompt."""

    def __init__(
        self, text_encoders: list, tokenizers: list, device: torch.device, dtype: torch.dtype, joint_width: int
    ) -> None:
        self.clips = list(zip(tokenizers[:2], text_encoders[:2], strict=True))
        self.t5 = text_encoders[2] if len(text_encoders) > 2 else None
        self.t5_tokenizer = tokenizers[2] if len(tokenizers) > 2 else None
        self.device, self.dtype, self.joint_width = device, dtype, joint_width
        limit = MAX_T5_TOKENS if self.t5_tokenizer is None else int(self.t5_tokenizer.model_max_length)
        self.t5_tokens = min(MAX_T5_TOKENS, limit)
        self._cache = PromptCache(self._encode)
        self.variant: Hashable = ()  # the LoRA set in use (Pipeline.use_loras): part of the cache key

    def __call__(self, prompt: str) -> tuple[Tensor, Tensor]:
        return self._cache(plain_prompt(prompt), self.variant)

    @torch.inference_mode()
    def _encode(self, prompt: str) -> tuple[Tensor, Tensor]:
        """``(hidden [tokens, width], pooled [width])`` for one prompt."""
        hiddens, pooled = [], []
        for tokenizer, encoder in self.clips:  # on the CPU or the device (engine.text_encoders)
            out = encoder(clip_ids(tokenizer, prompt, encoder.device), output_hidden_states=True)
            hiddens.append(out.hidden_states[-2].to(self.device, self.dtype))
            pooled.append(out[0].to(self.device))
        clip = torch.cat(hiddens, dim=-1)
        if self.t5 is None:
            t5 = torch.zeros(1, self.t5_tokens, self.joint_width, device=self.device, dtype=self.dtype)
        else:
            t5 = self.t5(t5_ids(self.t5_tokenizer, prompt, self.t5_tokens, self.t5.device))[0]
            t5 = t5.to(self.device, self.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2)[0], torch.cat(pooled, dim=-1)[0].to(self.dtype)

    def conditioning(self, prompt: str, negative_prompt: str, *, rows: int, guidance: float, **_) -> Conditioning:
        """One job's rows: its prompt's, then its negative prompt's (the CFG layout of the batch)."""
        (hidden, pooled), (negative_hidden, negative_pooled) = self(prompt), self(negative_prompt)
        return Conditioning(
            embeds=torch.stack([hidden] * rows + [negative_hidden] * rows),
            guidance=torch.full((rows,), guidance, device=self.device, dtype=torch.float32),
            added={"pooled": torch.stack([pooled] * rows + [negative_pooled] * rows)},
        )


def sd3_noise(scheduler_config: dict, latent_scale: int = 8, patch: int = 2) -> FlowNoise:
    return FlowNoise(FlowShift.from_config(scheduler_config), sd3_sigmas, latent_scale=latent_scale, patch=patch)


class SD3Denoiser(FlowDenoiser):
    family = "sd3"

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        n = x.shape[0]
        model_in = x.to(self.dtype)
        inputs = dict(
            hidden_states=torch.cat([model_in, model_in]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.added["pooled"],
        )
        out, bucket = self.run(n, model_in, cond, inputs)
        out = out.float()
        positive, negative = out[:n], out[bucket : bucket + n]
        # diffusers guides only above a scale of 1 (Large Turbo runs at 0): the prompt's row alone.
        scale = rows(cond.guidance)
        return torch.where(scale > 1, negative + scale * (positive - negative), positive)
