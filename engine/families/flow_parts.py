"""What the flow families' prompt encoders and denoisers share.

:class:`PromptCache` is the LRU of encoded prompts that :class:`engine.families.sd.denoiser.PromptEncoder`
keeps for the SD families (members reroll the same prompt often). :class:`FlowDenoiser` is the
part of ``denoiser(x, sigma, cond) -> x0`` that is the same for SD 3.5 and Flux: the network
predicts the velocity ``v = noise - x0`` at ``sigma``, so ``x0 = x - sigma * v``
(:mod:`engine.families.flow`). The batch reads a denoiser's timesteps and input scales from its
tables (:meth:`timesteps`, :meth:`input_scale`).

Compiled graphs (``engine.compile``) work as for the SD families' UNet (:meth:`FlowDenoiser.compile`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from engine.batching.graphs import CompiledNetwork, UNetGraphs
from engine.batching.sampler_graphs import SamplerGraphs
from engine.families.flow import FlowNoise
from engine.families.flow_storage import stored_in_fp8
from engine.features.lora_slots import RowsNetwork
from engine.prompt_syntax import strip_lora_tags
from engine.sampling.sampler_steps import rows

log = logging.getLogger(__name__)

E = TypeVar("E")


class PromptCache(Generic[E]):
    """Encoded prompts by (variant, prompt), least recently used out. ``variant`` is what else the
    encoding depends on: the LoRA set applied to the text encoders (a prompt encoder's ``variant``,
    which :meth:`engine.pipeline.Pipeline.use_loras` sets, as for the SD families' encoder)."""

    def __init__(self, encode: Callable[[str], E], size: int = 64) -> None:
        self.encode, self.size = encode, size
        self._cache: OrderedDict[Hashable, E] = OrderedDict()

    def __call__(self, prompt: str, variant: Hashable = ()) -> E:
        key = (variant, prompt)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        encoded = self._cache[key] = self.encode(prompt)
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return encoded


def plain_prompt(prompt: str) -> str:
    """The text a flow family's encoders read: LoRA tags are not text (:class:`engine.features.lora.LoraLibrary`
    applies them to the model)."""
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


class FlowDenoiser(CompiledNetwork):
    """``x0 = x - sigma * v(x, sigma, cond)`` for a flow transformer; subclasses run the network.

    :meth:`compile` (``engine.compile``) runs the transformer in the bounded set of graphs of
    :mod:`engine.batching.graphs`, rows padded to buckets in input buffers of their own, and the samplers'
    step after it in :mod:`engine.batching.sampler_graphs`, as the SD families' UNet does.
    """

    #: Network rows per image: 2 with classifier-free guidance (SD 3.5), 1 without (Flux).
    pairs = 2
    #: Network inputs without a row per image (passed as they are to a graph).
    shared_inputs: frozenset[str] = frozenset()
    family = "flow"

    def __init__(self, network, noise: FlowNoise) -> None:
        self.network = network
        self.rows_network = RowsNetwork(network)  # the transformer with the rows' LoRA inputs
        self.noise = noise
        self.dtype = network.dtype
        self.device = network.device

    def compile(self, compiler: Callable[[Callable[..., Any]], Callable[..., Any]], max_graphs: int = 24) -> None:
        """As :meth:`engine.families.sd.denoiser.Denoiser.compile`, for the transformer. Once per model. A
        transformer stored in float8 (``model.weights``) runs eager, said once in the log: its
        layerwise casting cannot be traced (:func:`engine.families.flow_storage.stored_in_fp8`)."""
        if stored_in_fp8(self.network):
            log.warning("engine.compile: this %s model's weights are stored in float8; it runs eager", self.family)
            return
        if self.unet_graphs is None:
            self.unet_graphs = UNetGraphs(
                compiler(self.rows_network),
                max_graphs,
                pairs=self.pairs,
                shared=self.shared_inputs,
                per_step=("hidden_states", "timestep"),
                what=f"{self.family} transformer",
            )
            self.sampler_graphs = SamplerGraphs(compiler, max_graphs)

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

    def run(self, n: int, network_in: Tensor, cond, inputs: dict[str, Any]) -> tuple[Tensor, int]:
        """The network's output for ``inputs`` (``n`` images' rows), through a graph when compiled,
        and the bucket its rows were padded to (``n`` when eager): rows ``[pair * bucket + i]``."""
        if (lora := getattr(cond, "lora", None)) is not None:  # engine.features.lora_slots
            inputs = inputs | lora.inputs()
        bucket, run = n, self.rows_network
        graphs = self.unet_graphs
        if graphs is not None and (key := graphs.admit(n, network_in, cond)) is not None:
            (bucket, inputs), run = graphs.inputs(key, n, inputs, cond), graphs.run
        return run(**inputs, return_dict=False)[0], bucket

    def velocity(self, x: Tensor, t: Tensor, cond) -> Tensor:
        """The network's guided velocity for rows ``x`` at timesteps ``t`` ([rows], sigma * 1000)."""
        raise NotImplementedError(f"{type(self).__name__} must run its network")
