"""The model behind one interface: ``denoiser(x, sigma, cond) -> x0``.

Samplers never see a UNet. :class:`Denoiser` adapts diffusers' ``UNet2DConditionModel`` (epsilon
or v prediction, SD1/SD2/SDXL) the way k-diffusion's ``external.py`` does: scale the input to
unit variance, turn each row's sigma into a training timestep, run the UNet once on every row's
prompt *and* negative prompt, mix them with each row's own guidance scale (classifier-free
guidance, Ho & Salimans 2022), and return the predicted clean latents.

:class:`Conditioning` holds those per-row inputs; ``Conditioning.cat`` joins jobs' rows when a
batch changes, so a step costs one UNet call whatever shares the batch.
:class:`PromptEncoder` runs the text encoders, with an LRU cache per prompt (members reroll the
same prompt often, and the negative prompt is usually the server default).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.samplers import rows
from engine.schedules import ModelSchedule, sigma_to_t


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt through the text encoder(s)."""

    hidden: Tensor  # [tokens, width]: what cross-attention reads
    pooled: Tensor | None  # [width_2]: SDXL's pooled text embedding, None for SD1/SD2


@dataclass(frozen=True)
class Conditioning:
    """Per-row UNet conditioning: rows' prompts first, then the same rows' negative prompts."""

    embeds: Tensor  # [2 * rows, tokens, width]
    guidance: Tensor  # [rows], float32
    added: dict[str, Tensor] | None = None  # SDXL: text_embeds [2 * rows, P], time_ids [2 * rows, 6]

    @property
    def rows(self) -> int:
        return self.guidance.shape[0]

    def halves(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t[: self.rows], t[self.rows :]

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Join several jobs' rows, keeping all prompts ahead of all negative prompts."""

        def join(get) -> Tensor:
            firsts, seconds = zip(*(part.halves(get(part)) for part in parts))
            return torch.cat([*firsts, *seconds])

        added = None
        if parts[0].added is not None:
            added = {key: join(lambda part, key=key: part.added[key]) for key in parts[0].added}
        return Conditioning(
            embeds=join(lambda part: part.embeds),
            guidance=torch.cat([part.guidance for part in parts]),
            added=added,
        )


class PromptEncoder:
    """Text encoder(s) and tokenizer(s), with an LRU cache of encoded prompts."""

    def __init__(self, text_encoders: list, tokenizers: list, device: torch.device, dtype: torch.dtype,
                 cache_size: int = 64) -> None:
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.device, self.dtype = device, dtype
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PromptEmbedding] = OrderedDict()

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    def __call__(self, prompt: str) -> PromptEmbedding:
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        embedding = self._encode(prompt)
        self._cache[prompt] = embedding
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embedding

    @torch.inference_mode()
    def _encode(self, prompt: str) -> PromptEmbedding:
        hiddens, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            # Prompts past 77 tokens are cut, as in diffusers (AUTOMATIC1111 chunks them instead).
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=self.is_sdxl)
            if self.is_sdxl:
                # SDXL reads both encoders' penultimate layers side by side, and the second
                # encoder's projected pooled output as an extra embedding.
                hiddens.append(out.hidden_states[-2])
                pooled = out[0]
            else:
                hiddens.append(out[0])
        hidden = torch.cat(hiddens, dim=-1)[0].to(self.dtype)
        return PromptEmbedding(hidden=hidden, pooled=None if pooled is None else pooled[0].to(self.dtype))

    def conditioning(self, prompt: str, negative_prompt: str, *, rows: int, guidance: float,
                     width: int, height: int) -> Conditioning:
        """One job's conditioning: ``rows`` images with the same prompts and guidance."""
        positive, negative = self(prompt), self(negative_prompt)
        embeds = torch.stack([positive.hidden] * rows + [negative.hidden] * rows)
        added = None
        if self.is_sdxl:
            # SDXL's micro-conditioning: original size, crop top-left, target size.
            time_ids = torch.tensor([height, width, 0, 0, height, width], device=self.device, dtype=self.dtype)
            added = {
                "text_embeds": torch.stack([positive.pooled] * rows + [negative.pooled] * rows),
                "time_ids": time_ids.expand(2 * rows, 6),
            }
        guidance_rows = torch.full((rows,), guidance, device=self.device, dtype=torch.float32)
        return Conditioning(embeds=embeds, guidance=guidance_rows, added=added)


class Denoiser:
    """``denoiser(x, sigma, cond) -> x0`` over a diffusers UNet, classifier-free guided per row."""

    def __init__(self, unet, schedule: ModelSchedule, prediction_type: str = "epsilon") -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
        self.unet = unet
        self.prediction_type = prediction_type
        self.dtype = unet.dtype
        # Kept on the device in float32 so a step does the timestep lookup without a transfer.
        self.log_sigmas = schedule.log_sigmas.to(device=unet.device, dtype=torch.float32)

    @torch.inference_mode()
    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        c_in = rows(1 / (sigma**2 + 1).sqrt())
        t = sigma_to_t(sigma, self.log_sigmas)
        model_in = (x * c_in).to(self.dtype)
        out = self.unet(
            torch.cat([model_in, model_in]),
            torch.cat([t, t]),
            encoder_hidden_states=cond.embeds,
            added_cond_kwargs=cond.added,
            return_dict=False,
        )[0].float()
        positive, negative = out.chunk(2)
        guided = negative + rows(cond.guidance) * (positive - negative)
        return self.to_x0(guided, x, sigma)

    def to_x0(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """Clean latents from the UNet's output (eps: x - sigma eps; v: Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return x - out * rows(sigma)
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1).sqrt()
        return x * rows(c_skip) + out * rows(c_out)
