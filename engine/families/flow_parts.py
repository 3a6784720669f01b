"""What the flow families' prompt encoders and denoisers share.

:class:`PromptCache` is the LRU of encoded prompts that :class:`engine.denoiser.PromptEncoder`
keeps for the SD families (members reroll the same prompt often). :class:`FlowDenoiser` is the
part of ``denoiser(x, sigma, cond) -> x0`` that is the same for SD 3.5 and Flux: the network
predicts the velocity ``v = noise - x0`` at ``sigma``, so ``x0 = x - sigma * v``
(:mod:`engine.families.flow`). The batch reads a denoiser's timesteps and input scales from its
tables (:meth:`timesteps`, :meth:`input_scale`).

Compiled graphs (``engine.compile``) are made for the SD families' UNet only so far: a flow
denoiser runs eager and says so once in the log when asked to compile.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from engine.families.flow import FlowNoise
from engine.prompt_syntax import strip_lora_tags
from engine.sampler_steps import rows

log = logging.getLogger(__name__)

E = TypeVar("E")


class PromptCache(Generic[E]):
    """Encoded prompts by (prompt, anything else the encoding depends on), least recently used out."""

    def __init__(self, encode: Callable[[str], E], size: int = 64) -> None:
        self.encode, self.size = encode, size
        self._cache: OrderedDict[Hashable, E] = OrderedDict()

    def __call__(self, prompt: str) -> E:
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        encoded = self._cache[prompt] = self.encode(prompt)
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return encoded


def plain_prompt(prompt: str) -> str:
    """The text a flow family's encoders read: LoRA tags are not text (and LoRAs are refused on
    these families before a job gets here: see :meth:`engine.pipeline.Pipeline.check`)."""
    return strip_lora_tags(prompt)


def t5_ids(tokenizer, prompt: str, length: int, device: torch.device) -> Tensor:
    """T5's token ids padded to ``length`` (longer prompts are cut, as both pipelines do)."""
    ids = tokenizer(
        [prompt], padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


def clip_ids(tokenizer, prompt: str, device: torch.device) -> Tensor:
    """CLIP's 77 token ids (the pipelines cut longer prompts; so do we on these families)."""
    ids = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


class FlowDenoiser:
    """``x0 = x - sigma * v(x, sigma, cond)`` for a flow transformer; subclasses run the network."""

    def __init__(self, network, noise: FlowNoise) -> None:
        self.network = network
        self.noise = noise
        self.dtype = network.dtype
        self.device = network.device
        self.sampler_graphs = None  # the batch's compiled sampler step: not made for flow families yet
        self._warned = False

    # What the worker and /metrics read of a compiled denoiser: nothing is compiled here.
    compiled = False
    graphs: dict = {}
    eager_calls = 0

    def compile(self, compiler: Callable[[Callable[..., Any]], Callable[..., Any]], max_graphs: int = 24) -> None:
        if not self._warned:
            log.warning("engine.compile is not available for %s models yet: this model runs eager", self.family)
            self._warned = True

    family = "flow"

    def timesteps(self, sigma: Tensor) -> Tensor:
        return self.noise.timesteps(sigma)

    def input_scale(self, sigma: Tensor) -> Tensor:
        return self.noise.input_scale(sigma)

    @torch.inference_mode()
    def __call__(
        self, x: Tensor, sigma: Tensor, cond, *, timesteps: Tensor | None = None, c_in: Tensor | None = None
    ) -> Tensor:
        """``timesteps``: the batch's table column (``[2 * rows]``, the rows' timesteps twice, as the
        CFG families read them); computed from ``sigma`` when not given. ``c_in`` is 1 here."""
        n = x.shape[0]
        t = (sigma.float() * self.noise.time_scale) if timesteps is None else timesteps[:n]
        velocity = self.velocity(x, t, cond)
        return x - velocity * rows(sigma)

    def velocity(self, x: Tensor, t: Tensor, cond) -> Tensor:
        """The network's guided velocity for rows ``x`` at timesteps ``t`` ([rows], sigma * 1000)."""
        raise NotImplementedError(f"{type(self).__name__} must run its network")
