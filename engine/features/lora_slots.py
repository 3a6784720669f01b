"""Per-row LoRA: every row of the running batch adds its own LoRAs' low-rank updates, so jobs
with different LoRA sets share one denoising call.

Why our own and not peft's: peft (and diffusers' adapters, built on it) applies one set of active
adapters to every row of a forward call; its mixed-batch mode (``adapter_names=``) splits the
batch into one sub-batch per adapter in a Python loop (kernels per step grow with the number of
sets), takes one adapter per row, and stays off convolutions' grouped form. Here a step is the
same few kernels whatever the mix (Punica's and S-LoRA's idea, for the UNet and the transformers):

- **Slot buffers.** Each LoRA-bearing layer holds ``down [slots, rank, in (x kh x kw)]`` and
  ``up [slots, rank, out]`` (``up`` carries the file's ``alpha / rank``), padded with zeros to
  ``engine.lora_max_rank``. They are made when a LoRA first changes that layer and written in
  place after, so compiled graphs and CUDA graphs keep their pointers across loads.
- **Rows.** A job's rows carry :class:`LoraRows`, ``slots [rows, K]`` and each rank column's
  weight, ``gains [rows, K * rank]`` (K: the most LoRAs a row of the batch has; a row with fewer
  pads with weight 0), made once per job and joined once per membership change: a field of the
  family's conditioning, joined with the batch's other rows like every row tensor (the negative
  prompt rows of CFG carry their image's). The denoiser passes them to the network as the
  inputs ``lora_slots``/``lora_gains`` (:class:`RowsNetwork`), so the compiled graphs pad them
  to their bucket as they pad the prompt embeddings, and a step adds no kernel outside the network.
- **A layer's step.** ``y = base(x) + bmm(bmm(x, down[slots]^T) * gains, up[slots])``: two
  gathers, two batched matrix products and a multiply, one set for every row; a convolution's
  down projection is one grouped convolution (a group per row), its up projection a bmm.
- **Loading.** :class:`LoraSlots` copies a LoRA (already read by peft: every layout diffusers
  converts, :mod:`engine.features.lora_loading`) into a free slot, else into the least recently
  used one that no live job's rows use; when every slot is in use the job waits
  (:class:`SlotsBusy`). A LoRA over the maximum rank, or with layers this cannot run per row
  (DoRA, biases, embeddings), runs through peft on the whole network in a batch of its own, as
  before this module (:meth:`engine.features.lora.LoraLibrary.runs_whole`).
- **When a LoRA loads.** At its job's prepare, on the worker thread between two steps of the
  running batch, as every job is prepared: never inside a step, and into a slot that no running
  row reads, so the batch's rows never see a half-copied slot. The running batch does wait for the
  load (reading the file, diffusers' conversion, peft's adapter, the copy into the slot), once
  per LoRA not yet in a slot; moving the file's read off the thread is left to do.
- **No merged fast path yet.** Measured with ``bench/throughput.py --loras 4`` (BENCHMARKS.md,
  the tiny UNet on the CPU): when every row uses one set, the rows' low-rank products cost about
  a fifth of a step more than the LoRA merged into the weights would, and a merge and unmerge
  about a millisecond, so the measurement favours a merged path for such batches. It is not
  built: the merge must be undone exactly (in 16-bit, merging and subtracting again drifts the
  checkpoint's weights) whenever a job of another set joins, between two steps; every row runs
  from the slots until a GPU measurement at real sizes decides it.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import EngineError

log = logging.getLogger(__name__)


class SlotsBusy(EngineError):
    """Every LoRA slot holds a LoRA that a job in the batch uses: the job waits for one to leave."""


class RowContext:
    """The rows of the network call under way, for the slot layers to read (None: no LoRA rows)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.slots: Tensor | None = None  # [rows, K] long
        self.gains: Tensor | None = None  # [rows, K * rank]: each rank column's row weight


@dataclass(frozen=True, eq=False)  # by identity: the live jobs' rows are a weak set
class LoraRows:
    """Per network row: the slots of its LoRAs (``[rows, K]``) and their weights, repeated over
    each slot's rank columns (``[rows, K * rank]``, in the network's dtype)."""

    slots: Tensor
    gains: Tensor
    used: frozenset[int] = frozenset()  # the slots its LoRAs sit in (known on the host)

    @property
    def rank(self) -> int:
        return self.gains.shape[1] // self.slots.shape[1]

    def inputs(self) -> dict[str, Tensor]:
        return {"lora_slots": self.slots, "lora_gains": self.gains}

    def halves(self, pairs: int) -> list[LoraRows]:
        n = self.slots.shape[0] // pairs
        return [LoraRows(self.slots[i * n : (i + 1) * n], self.gains[i * n : (i + 1) * n]) for i in range(pairs)]

    @staticmethod
    def join(parts: list[tuple[LoraRows | None, int]], pairs: int) -> LoraRows | None:
        """Jobs' rows (``(rows or None, network rows)``) as the batch lays them out: with ``pairs``
        2, every job's first halves (prompts) ahead of every job's second halves. None: no LoRA."""
        present = [rows for rows, _ in parts if rows is not None]
        if not present:
            return None
        width, rank, like = max(rows.slots.shape[1] for rows in present), present[0].rank, present[0].gains
        filled = []
        for rows, count in parts:
            if rows is None:
                rows = LoraRows(like.new_zeros((count, width), dtype=torch.long), like.new_zeros((count, width * rank)))
            pad = width - rows.slots.shape[1]
            filled.append(LoraRows(F.pad(rows.slots, (0, pad)), F.pad(rows.gains, (0, pad * rank)), rows.used))
        ordered = [half for i in range(pairs) for rows in filled for half in rows.halves(pairs)[i : i + 1]]
        return LoraRows(
            torch.cat([r.slots for r in ordered]),
            torch.cat([r.gains for r in ordered]),
            frozenset().union(*(r.used for r in filled)),
        )


class SlotLayer(nn.Module):
    """A Linear or Conv2d plus each row's low-rank updates from the slot buffers.

    It wraps the innermost layer under peft's wrapper (``base_layer``, which peft follows to the
    real layer for its own adapters), so peft's adapters and the slots coexist.
    """

    def __init__(self, base: nn.Module, context: RowContext, count: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base
        self.context = context
        self.conv = isinstance(base, nn.Conv2d)
        rank, device = context.rank, base.weight.device
        inner = (base.in_channels, *base.kernel_size) if self.conv else (base.in_features,)
        out = base.out_channels if self.conv else base.out_features
        self.register_buffer("down", torch.zeros(count, rank, *inner, dtype=dtype, device=device), persistent=False)
        self.register_buffer("up", torch.zeros(count, rank, out, dtype=dtype, device=device), persistent=False)

    @property
    def weight(self) -> Tensor:  # what code that reads peft's ``base_layer`` expects to find
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        slots, gains = self.context.slots, self.context.gains
        if slots is None:
            return out
        delta = self._conv_delta(x, slots, gains) if self.conv else self._linear_delta(x, slots, gains)
        return out + delta.to(out.dtype)

    def _linear_delta(self, x: Tensor, slots: Tensor, gains: Tensor) -> Tensor:
        n = slots.shape[0]
        rows = x.reshape(n, -1, x.shape[-1]).to(self.down.dtype)  # [rows, tokens, in]
        low = (
            torch.bmm(rows, self.down[slots].flatten(1, 2).transpose(1, 2)) * gains[:, None]
        )  # [rows, tokens, K * rank]
        return torch.bmm(low, self.up[slots].flatten(1, 2)).reshape(*x.shape[:-1], -1)

    def _conv_delta(self, x: Tensor, slots: Tensor, gains: Tensor) -> Tensor:
        base, n = self.base_layer, slots.shape[0]
        x = x.to(self.down.dtype)
        padding = base.padding
        if base.padding_mode != "zeros":  # seamless tiling (engine.features.tiling) pads circularly
            x, padding = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
        down = self.down[slots].flatten(0, 2)  # [rows * K * rank, in, kh, kw]: one group per row
        low = F.conv2d(x.reshape(1, -1, *x.shape[2:]), down, None, base.stride, padding, base.dilation, groups=n)
        h, w = low.shape[2:]
        low = low.reshape(n, -1, h * w) * gains[:, :, None]  # [rows, K * rank, h * w]
        return torch.bmm(self.up[slots].flatten(1, 2).transpose(1, 2), low).reshape(n, -1, h, w)


class RowsNetwork(nn.Module):
    """The denoising network with the rows' LoRA inputs: what the denoiser calls (and compiles)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, lora_slots: Tensor | None = None, lora_gains: Tensor | None = None, **inputs):
        context: RowContext | None = getattr(self.network, "lora_rows", None)
        if context is None or lora_slots is None:
            return self.network(**inputs)
        context.slots, context.gains = lora_slots, lora_gains
        try:
            return self.network(**inputs)
        finally:
            context.slots = context.gains = None


def peft_layers(network: nn.Module, adapter: str) -> Iterable[tuple[str, nn.Module]]:
    """The network's peft LoRA layers that hold ``adapter``."""
    for name, module in network.named_modules():
        if adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {}):
            yield name, module


def innermost(layer: nn.Module) -> nn.Module:
    while hasattr(layer, "base_layer"):
        layer = layer.base_layer
    return layer


class LoraSlots:
    """One network's slot buffers and which LoRA each slot holds (see the module doc)."""

    def __init__(self, network: nn.Module, count: int, rank: int, dtype: torch.dtype) -> None:
        self.network, self.count, self.rank, self.dtype = network, count, rank, dtype
        self.context = RowContext(rank)
        network.lora_rows = self.context  # read by RowsNetwork
        self.layers: dict[str, SlotLayer] = {}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # LoRA name -> slot, least recently used first
        self._jobs: weakref.WeakSet[LoraRows] = weakref.WeakSet()  # live jobs' rows
        self.loads = 0  # LoRAs copied into a slot
        self._checked: dict[str, str | None] = {}  # peft adapter -> why it cannot run per row
        self._collected = float("-inf")  # when the garbage was last collected for a slot

    def why_not(self, adapter: str) -> str | None:
        """Why a peft adapter of the network cannot run per row, or None (looked at once)."""
        if adapter not in self._checked:
            self._checked[adapter] = self._why_not(adapter)
        return self._checked[adapter]

    def _why_not(self, adapter: str) -> str | None:
        for name, layer in peft_layers(self.network, adapter):
            base = innermost(layer)
            if adapter in getattr(layer, "lora_embedding_A", {}):
                return f"it changes the embedding {name}"
            if getattr(layer, "use_dora", {}).get(adapter):
                return "it is a DoRA"
            if getattr(layer.lora_B[adapter], "bias", None) is not None:
                return "its up weights have biases"
            if not isinstance(base, nn.Linear | nn.Conv2d) or getattr(base, "groups", 1) != 1:
                return f"it changes {name}, a {type(base).__name__}"
            if (rank := layer.lora_A[adapter].weight.shape[0]) > self.rank:
                return f"its rank {rank} is over engine.lora_max_rank ({self.rank})"
        return None

    def in_use(self) -> set[int]:
        return set().union(*(rows.used for rows in self._jobs))

    def place(self, name: str, adapter: str, keep: set[int] = frozenset()) -> int:
        """The slot holding LoRA ``name`` (peft adapter ``adapter``), copied in now if need be;
        ``keep``: slots not to take (the same job's other LoRAs)."""
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            return self.slot_of[name]
        taken = set(self.slot_of.values())
        free = [s for s in range(self.count) if s not in taken]
        if not free:
            if time.monotonic() - self._collected > 1:  # a waiting job retries at every step
                gc.collect()  # finished jobs' rows still in reference cycles let their slots go
                self._collected = time.monotonic()
            busy = self.in_use() | keep
            idle = [n for n, s in self.slot_of.items() if s not in busy]  # least recently used first
            if not idle:
                raise SlotsBusy(f"all {self.count} LoRA slots are used by jobs in the batch (engine.lora_slots)")
            free = [self.slot_of.pop(idle[0])]
        slot = free[0]
        with torch.no_grad():
            for layer in self.layers.values():
                layer.down[slot].zero_()
                layer.up[slot].zero_()
            for name_, peft_layer in peft_layers(self.network, adapter):
                self._copy(name_, peft_layer, adapter, slot)
        self.slot_of[name] = slot
        self.loads += 1
        return slot

    def _copy(self, name: str, peft_layer: nn.Module, adapter: str, slot: int) -> None:
        layer = self.layers.get(name)
        if layer is None:
            base = innermost(peft_layer)
            holder = peft_layer
            while isinstance(holder.base_layer, nn.Module) and hasattr(holder.base_layer, "base_layer"):
                holder = holder.base_layer
            layer = self.layers[name] = SlotLayer(base, self.context, self.count, self.dtype)
            holder.base_layer = layer
        down = peft_layer.lora_A[adapter].weight  # [r, in(, kh, kw)]
        up = peft_layer.lora_B[adapter].weight.flatten(1)  # [out, r] (a conv's up is 1x1)
        r = down.shape[0]
        layer.down[slot, :r].copy_(down)
        layer.up[slot, :r].copy_((up * peft_layer.scaling[adapter]).t())

    def rows(self, uses: list[tuple[int, float]], count: int, device: torch.device) -> LoraRows:
        """``count`` network rows of one job whose LoRAs sit in ``uses`` (slot, weight)."""
        slots = torch.tensor([[s for s, _ in uses]] * count, dtype=torch.long)
        gains = torch.tensor([[w for _, w in uses for _ in range(self.rank)]] * count, dtype=self.dtype)
        rows = LoraRows(slots.to(device), gains.to(device), frozenset(s for s, _ in uses))
        self._jobs.add(rows)
        return rows
