"""The model behind one interface: ``denoiser(x, sigma, cond) -> x0``.

Samplers never see a UNet. :class:`Denoiser` adapts diffusers' ``UNet2DConditionModel`` (epsilon
or v prediction, SD1/SD2/SDXL) the way k-diffusion's ``external.py`` does: scale the input to
unit variance, turn each row's sigma into a training timestep, run the UNet once on every row's
prompt *and* negative prompt, mix them with each row's own guidance scale (classifier-free
guidance, Ho & Salimans 2022), and return the predicted clean latents.

:class:`Conditioning` holds those per-row inputs; ``Conditioning.cat`` joins jobs' rows when a
batch changes, so a step costs one UNet call whatever shares the batch. Rows whose prompts take
fewer 77-token chunks are padded and masked out of cross-attention (see :mod:`engine.families.sd.prompts`).
:class:`PromptEncoder` runs the text encoders on AUTOMATIC1111-style prompts (emphasis, chunks,
embeddings), with an LRU cache per prompt (members reroll the same prompt often, and the negative
prompt is usually the server default).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.batching.graphs import CompiledNetwork, UNetGraphs
from engine.batching.sampler_graphs import SamplerGraphs
from engine.families.sd.prompts import EmbeddingLibrary, embeddings_injected, emphasize
from engine.features.controlnet import ControlRows, control_residuals
from engine.features.ip_adapter import IPRows, ip_inputs
from engine.features.lora_slots import LoraRows, RowsNetwork
from engine.prompt_syntax import ChunkedPrompt, chunk_prompt, chunks_needed, strip_lora_tags
from engine.sampling.samplers import rows
from engine.sampling.schedules import ModelSchedule, sigma_to_t

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt through the text encoder(s)."""

    hidden: Tensor  # [77 * chunks, width]: what cross-attention reads
    pooled: Tensor | None  # [width_2]: SDXL's pooled text embedding, None for SD1/SD2


@dataclass(frozen=True)
class Conditioning:
    """Per-row UNet conditioning: rows' prompts first, then the same rows' negative prompts."""

    embeds: Tensor  # [2 * rows, tokens, width]
    guidance: Tensor  # [rows], float32
    added: dict[str, Tensor] | None = None  # SDXL: text_embeds [2 * rows, P], time_ids [2 * rows, 6]
    #: [2 * rows, tokens] bool, True where a row has a token; None when no row is padded.
    mask: Tensor | None = None
    #: An inpainting UNet's extra input channels, [rows, 1 + C, h, w] (the mask, then the masked
    #: image's latents; see engine.features.inpaint); None for a plain UNet.
    image: Tensor | None = None
    #: Each row's LoRA slots and weights (engine.features.lora_slots), a negative prompt row's
    #: those of its image; None when no row has a LoRA.
    lora: LoraRows | None = None
    #: The rows' ControlNet units (engine.features.controlnet); None when no row has one.
    control: ControlRows | None = None
    #: The rows' IP-Adapter image tokens and scales (engine.features.ip_adapter); None when no row has one.
    ip: IPRows | None = None
    #: An InstructPix2Pix UNet's image guidance per row, [rows] float32 (engine.features.instruct_edit).
    image_guidance: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.guidance.shape[0]

    def halves(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t[: self.rows], t[self.rows :]

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Join several jobs' rows, keeping all prompts ahead of all negative prompts."""

        def join(get) -> Tensor:
            firsts, seconds = zip(*(part.halves(get(part)) for part in parts), strict=False)
            return torch.cat([*firsts, *seconds])

        added = None
        if parts[0].added is not None:
            added = {key: join(lambda part, key=key: part.added[key]) for key in parts[0].added}
        firsts, seconds = zip(*(part.halves(part.embeds) for part in parts), strict=False)
        first_masks, second_masks = zip(
            *(part.halves(part.mask) if part.mask is not None else (None, None) for part in parts), strict=False
        )
        embeds, mask = padded([*firsts, *seconds], [*first_masks, *second_masks])
        image = None if parts[0].image is None else torch.cat([part.image for part in parts])
        image_guidance = None
        if parts[0].image_guidance is not None:
            image_guidance = torch.cat([part.image_guidance for part in parts])
        return Conditioning(
            embeds=embeds,
            guidance=torch.cat([part.guidance for part in parts]),
            added=added,
            mask=mask,
            image=image,
            lora=LoraRows.join([(part.lora, part.embeds.shape[0]) for part in parts], pairs=2),
            control=ControlRows.cat([(part.control, part.rows) for part in parts]),
            ip=IPRows.cat([(part.ip, part.rows) for part in parts]),
            image_guidance=image_guidance,
        )


def padded(embeds: list[Tensor], masks: list[Tensor | None]) -> tuple[Tensor, Tensor | None]:
    """Row groups of different token counts as one tensor, zero-padded, and the mask of real tokens.

    ``masks[i]`` is None when ``embeds[i]`` has no padding yet. The result's mask is None when
    nothing is padded, so a batch of equal-length prompts runs the UNet exactly as before.
    """
    longest = max(e.shape[1] for e in embeds)
    if all(e.shape[1] == longest for e in embeds) and all(m is None for m in masks):
        return torch.cat(embeds), None
    grown, grown_masks = [], []
    for e, m in zip(embeds, masks, strict=False):
        if m is None:
            m = torch.ones(e.shape[:2], dtype=torch.bool, device=e.device)
        grown.append(torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])))
        grown_masks.append(torch.nn.functional.pad(m, (0, longest - m.shape[1]), value=False))
    return torch.cat(grown), torch.cat(grown_masks)


def final_layer_norm(encoder) -> torch.nn.Module:
    """The text encoder's last layer norm (transformers 5 keeps it on the model itself)."""
    return getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm


class PromptEncoder:
    """Text encoder(s) and tokenizer(s), with an LRU cache of encoded prompts.

    Prompts are read the AUTOMATIC1111 way (:mod:`engine.families.sd.prompts`): ``(word:1.3)`` emphasis,
    ``BREAK``, chunks of 75 tokens past 77, and textual-inversion embeddings from
    ``embeddings_dir`` by file stem. A prompt without any of these encodes exactly as the plain
    77-token tokenizer call did. ``<lora:...>`` tags are not text: they are left out here and
    applied to the model by :class:`engine.features.lora.LoraLibrary`, which sets :attr:`variant` (part
    of the cache key) to the LoRA set in use, since a LoRA changes the text encoder too.
    """

    def __init__(
        self,
        text_encoders: list,
        tokenizers: list,
        device: torch.device,
        dtype: torch.dtype,
        cache_size: int = 64,
        embeddings_dir: str | Path | None = None,
    ) -> None:
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.device, self.dtype = device, dtype
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Hashable, str], PromptEmbedding] = OrderedDict()
        self.variant: Hashable = ()  # what else, besides the prompt, the encoding depends on
        widths = [encoder.get_input_embeddings().embedding_dim for encoder in text_encoders]
        # SD 2.x's OpenCLIP encoder (1024 wide) is already cut at its penultimate layer.
        self.family_clip_skips = widths[0] != 1024
        self.embeddings = EmbeddingLibrary(embeddings_dir, tokenizers[0], widths)

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    def __call__(self, prompt: str, clip_skip: int = 1) -> PromptEmbedding:
        if self.embeddings.refresh():
            self._cache.clear()  # encodings made with the old set of embeddings
        key = (self.variant, clip_skip, prompt)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        embedding = self._encode(prompt, clip_skip)
        self._cache[key] = embedding
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embedding

    def chunked(self, prompt: str) -> ChunkedPrompt:
        """The prompt's tokens laid out in 75-token chunks (every encoder shares the layout)."""
        return chunk_prompt(strip_lora_tags(prompt), self.tokenizers[0], self.embeddings)

    def count_tokens(self, prompt: str) -> int:
        """A1111's token count (embeddings count as their vectors); see :func:`chunks_needed`."""
        return self.chunked(prompt).token_count

    def chunk_count(self, prompt: str) -> int:
        return chunks_needed(self.count_tokens(prompt))

    @torch.inference_mode()
    def _encode(self, prompt: str, clip_skip: int = 1) -> PromptEmbedding:
        """``clip_skip`` N > 1 (SD 1.x, as AUTOMATIC1111): the hidden state N layers from the end,
        through the encoder's final layer norm. SDXL already reads the penultimate layer, and
        AUTOMATIC1111 leaves clip skip out for SDXL and SD 2.x by default; so do we."""
        prompt_chunks = self.chunked(prompt)
        chunks = prompt_chunks.chunks
        hiddens, pooled = [], None
        for index, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.text_encoders, strict=False)):
            # Every chunk is one row of a single encoder call: [chunks, 77].
            ids = torch.tensor(
                [
                    chunk.input_ids(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                    for chunk in chunks
                ],
                device=self.device,
            )
            fixes = [[(offset, embedding.vectors[index]) for offset, embedding in chunk.fixes] for chunk in chunks]
            skip = clip_skip > 1 and not self.is_sdxl and self.family_clip_skips
            with embeddings_injected(encoder, fixes):
                out = encoder(ids, output_hidden_states=self.is_sdxl or skip)
            if skip:
                hidden = final_layer_norm(encoder)(out.hidden_states[-clip_skip])
            elif self.is_sdxl:
                # SDXL reads both encoders' penultimate layers side by side, and the second
                # encoder's projected pooled output of the first chunk (as A1111) as an extra embedding.
                hidden = out.hidden_states[-2]
                pooled = out[0][0]
            else:
                hidden = out[0]
            if prompt_chunks.weighted:
                weights = torch.tensor([chunk.full_weights() for chunk in chunks], device=self.device)
                hidden = emphasize(hidden, weights)
            hiddens.append(hidden.reshape(-1, hidden.shape[-1]))  # chunks joined along the tokens
        hidden = torch.cat(hiddens, dim=-1).to(self.dtype)
        return PromptEmbedding(hidden=hidden, pooled=None if pooled is None else pooled.to(self.dtype))

    def conditioning(
        self,
        prompt: str,
        negative_prompt: str,
        *,
        rows: int,
        guidance: float,
        width: int,
        height: int,
        clip_skip: int = 1,
    ) -> Conditioning:
        """One job's conditioning: ``rows`` images with the same prompts and guidance."""
        positive, negative = self(prompt, clip_skip), self(negative_prompt, clip_skip)
        rows_of = [positive.hidden[None]] * rows + [negative.hidden[None]] * rows
        embeds, mask = padded(rows_of, [None] * len(rows_of))
        added = None
        if self.is_sdxl:
            # SDXL's micro-conditioning: original size, crop top-left, target size.
            time_ids = torch.tensor([height, width, 0, 0, height, width], device=self.device, dtype=self.dtype)
            added = {
                "text_embeds": torch.stack([positive.pooled] * rows + [negative.pooled] * rows),
                "time_ids": time_ids.expand(2 * rows, 6),
            }
        guidance_rows = torch.full((rows,), guidance, device=self.device, dtype=torch.float32)
        return Conditioning(embeds=embeds, guidance=guidance_rows, added=added, mask=mask)


class Denoiser(CompiledNetwork):
    """``denoiser(x, sigma, cond) -> x0`` over a diffusers UNet, classifier-free guided per row.

    :meth:`compile` (``engine.compile``) runs the UNet through ``torch.compile`` (CUDA graphs with
    "reduce-overhead"), in the bounded set of graphs of :mod:`engine.batching.graphs`: rows padded to
    buckets, each graph reading input buffers of its own; and the samplers' step after it, in the
    graphs of :mod:`engine.batching.sampler_graphs` (the batch runs those).
    """

    def __init__(self, unet, schedule: ModelSchedule, prediction_type: str = "epsilon") -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
        self.unet = unet
        self.rows_network = RowsNetwork(unet)  # the UNet with the rows' LoRA inputs
        self.prediction_type = prediction_type
        self.dtype = unet.dtype
        # In float32, as a step used to look timesteps up on the device: the batch's tables are
        # made on the CPU from the same values (timesteps), a lone call looks them up on the device.
        self._log_sigmas_host = schedule.log_sigmas.to(dtype=torch.float32)
        self.log_sigmas = self._log_sigmas_host.to(unet.device)

    def compile(self, compiler: Callable[[Callable[..., Any]], Callable[..., Any]], max_graphs: int = 24) -> None:
        """Run the UNet as ``compiler(unet)`` from now on (e.g. ``functools.partial(torch.compile,
        mode="reduce-overhead", dynamic=False)``), rows padded to bucket sizes, at most
        ``max_graphs`` shapes; and the samplers' step as ``compiler`` makes it, at most
        ``max_graphs`` too. Once per model."""
        if self.unet_graphs is None:
            self.unet_graphs = UNetGraphs(compiler(self.rows_network), max_graphs)
            self.sampler_graphs = SamplerGraphs(compiler, max_graphs)

    def timesteps(self, sigma: Tensor) -> Tensor:
        """The UNet's fractional timestep for each sigma, on the CPU (for the batch's tables)."""
        return sigma_to_t(sigma.float().cpu(), self._log_sigmas_host).float()

    @staticmethod
    def input_scale(sigma: Tensor) -> Tensor:
        """What the UNet's input is scaled by at each sigma: 1 / sqrt(sigma^2 + 1) (k-diffusion's c_in)."""
        return 1 / (sigma**2 + 1).sqrt()

    @torch.inference_mode()
    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        cond: Conditioning,
        *,
        timesteps: Tensor | None = None,
        c_in: Tensor | None = None,
    ) -> Tensor:
        """``timesteps`` (``[2 * rows]``: the prompt rows', then the negative prompt rows') and
        ``c_in`` (``[rows]``) are what this computes from ``sigma`` when not given; the batch
        passes them from its tables, made once per membership change."""
        c_in = rows(self.input_scale(sigma) if c_in is None else c_in)
        if timesteps is None:
            t = sigma_to_t(sigma, self.log_sigmas)
            timesteps = torch.cat([t, t])
        model_in = (x * c_in).to(self.dtype)
        residuals = {}
        if cond.control is not None:  # ControlNets on their rows, before an inpainting UNet's channels
            down, mid = control_residuals(cond.control, model_in, sigma, timesteps, cond.embeds, cond.added)
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if cond.image is not None:  # an inpainting UNet: latents, mask, masked image latents
            model_in = torch.cat([model_in, cond.image.to(self.dtype)], dim=1)
        inputs = dict(
            sample=torch.cat([model_in, model_in]),
            timestep=timesteps,
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask,  # None unless rows differ in chunk count
            added_cond_kwargs=cond.added,
            **({} if cond.lora is None else cond.lora.inputs()),
            **residuals,
            **ip_inputs(cond.ip),
        )
        n = x.shape[0]
        bucket, run = n, self.rows_network
        graphs = self.unet_graphs
        # Image tokens are no graph input yet: a step with reference rows runs eager.
        if graphs is not None and cond.ip is None and (key := graphs.admit(n, model_in, cond)) is not None:
            (bucket, inputs), run = graphs.inputs(key, n, inputs, cond), graphs.run
        out = run(**inputs, return_dict=False)[0].float()
        positive, negative = out[:n], out[bucket : bucket + n]
        guided = negative + rows(cond.guidance) * (positive - negative)
        return self.to_x0(guided, x, sigma)

    def to_x0(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """Clean latents from the UNet's output (eps: x - sigma eps; v: Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return x - out * rows(sigma)
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1).sqrt()
        return x * rows(c_skip) + out * rows(c_out)
