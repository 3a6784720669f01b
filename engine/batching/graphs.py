"""The compiled UNet's graphs (``engine.compile``): a bounded, logged set, each with input buffers
of its own that the UNet reads in place.

A compiled graph is made for one input shape, and the running batch changes size whenever a job
joins or leaves, so the compiled UNet sees rows padded up to a bucket of :data:`BUCKETS` (copies
of the last row, whose outputs are dropped; rows never mix in a UNet): one graph per (bucket,
latent size, prompt length, masked). The set is bounded by ``engine.compile_graphs``, each new
graph is logged, and a shape past the bound runs eager, counted in
:attr:`UNetGraphs.eager_calls` and logged: never dynamo's silent fall-back at its own limit, which
is raised above ours.

Each graph's inputs live in buffers made once, marked as static addresses, so that a CUDA graph
("reduce-overhead") replays on them without first copying its inputs into buffers of its own.
The batch's conditioning (prompt embeddings, attention mask, SDXL's added embeddings) is written
into them only when the batch's members change (a new :class:`~engine.families.sd.denoiser.Conditioning`),
counted in :attr:`UNetGraphs.conditioning_writes`; only the latents and timesteps are written
every step. The samplers' step after the UNet has graphs of its own (:mod:`engine.batching.sampler_graphs`),
on the same buckets and within the same bound.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("engine.families.sd.denoiser")

#: Row counts a compiled UNet is made for; rows are padded up to the next (past the last: to a
#: multiple of :data:`BUCKET_STEP`). From 8 rows up at most a third of the rows are padding, where
#: powers of two waste up to half (9 rows run as 16, 33 as 64).
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32)
BUCKET_STEP = 16

#: Dynamo's recompile limit as this process found it (see :func:`within_bound`).
_DYNAMO_RECOMPILE_LIMIT = torch._dynamo.config.recompile_limit

#: The UNet inputs that change every step (a ControlNet's residuals too, where rows have one);
#: the others follow the conditioning.
PER_STEP = ("sample", "timestep", "down_block_additional_residuals", "mid_block_additional_residual")


def graph_counts(pipeline: Any) -> dict[str, tuple[int, int]] | None:
    """``{"unet": (graphs made, calls run eager), "sampler": (graphs made, steps run eager)}``
    of ``pipeline``'s compiled step (when it is compiled), and ``"lora": (LoRAs copied into
    slots, jobs whose set ran whole)`` (engine.features.lora), for the metrics; None when there
    is nothing to count (no model loaded)."""
    denoiser = getattr(pipeline, "denoiser", None)
    unet, sampler = getattr(denoiser, "unet_graphs", None), getattr(denoiser, "sampler_graphs", None)
    counts = {}
    if unet is not None and sampler is not None:
        counts["unet"] = (len(unet.graphs), unet.eager_calls)
        counts["sampler"] = (len(sampler.graphs), sampler.eager_steps)
    if (loras := getattr(pipeline, "loras", None)) is not None:
        counts["lora"] = (0 if loras.slots is None else loras.slots.loads, loras.whole_jobs)
    return counts or None


def within_bound(max_graphs: int) -> contextlib.AbstractContextManager:
    """Dynamo's own recompile limit (8) would silently run eager past it, so around the calls of
    a bounded set of graphs it is raised above their bound; other compiled code keeps its own."""
    return torch._dynamo.config.patch(recompile_limit=max(max_graphs + 1, _DYNAMO_RECOMPILE_LIMIT))


class GraphBound:
    """A bounded set of compiled graphs, by key: each new one logged, and past the bound every
    call counted in :attr:`eager_calls` and logged, to run eager (``what`` names them in the log)."""

    def __init__(self, what: str, max_graphs: int) -> None:
        self.what, self.max_graphs = what, max_graphs
        self.graphs: dict[tuple, int] = {}  # key -> calls made with it
        self.eager_calls = 0

    def admit(self, key: tuple, shape: Callable[[], str]) -> bool:
        """Whether ``key`` has a graph (one made, or a new one within the bound); ``shape()``
        describes it for the log (called only to log: a step with its graph formats nothing)."""
        if key in self.graphs:
            self.graphs[key] += 1
            return True
        if len(self.graphs) < self.max_graphs:
            self.graphs[key] = 1
            log.info("%s graph %d of at most %d: %s", self.what, len(self.graphs), self.max_graphs, shape())
            return True
        self.eager_calls += 1
        log.warning("no %s graph for %s: %d graphs made already (engine.compile_graphs); this step runs eager "
                    "(%d so far)", self.what, shape(), self.max_graphs, self.eager_calls)  # fmt: skip
        return False

    def run(self, compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``compiled`` within our bound (see :func:`within_bound`)."""
        with within_bound(self.max_graphs):
            return compiled(*args, **kwargs)


def bucket_rows(n: int) -> int:
    """The bucket ``n`` rows are padded to."""
    return next((b for b in BUCKETS if b >= n), -(-n // BUCKET_STEP) * BUCKET_STEP)


class CompiledNetwork:
    """What a denoiser whose network may run in compiled graphs shows the worker and /metrics (the
    SD families' UNet and the flow families' transformers alike); ``compile()`` sets the graphs."""

    unet_graphs: UNetGraphs | None = None  # the network's graphs (a transformer's too: "UNet" in /metrics)
    sampler_graphs: Any = None  # the samplers' step graphs (engine.batching.sampler_graphs), set with them

    @property
    def compiled(self) -> bool:
        return self.unet_graphs is not None

    @property
    def graphs(self) -> dict[tuple, int]:
        """The network's graphs: (bucket, latent shape, tokens, masked) -> calls made with it."""
        return {} if self.unet_graphs is None else self.unet_graphs.graphs

    @property
    def eager_calls(self) -> int:
        """Network calls past the bound on graphs, run eager (logged)."""
        return 0 if self.unet_graphs is None else self.unet_graphs.eager_calls


class UNetGraphs:
    """The denoising network's graphs: a UNet's, or a flow family's transformer's.

    ``pairs``: network rows per image (2 with classifier-free guidance: every image's prompt row,
    then all its negative-prompt rows; 1 for Flux). ``shared``: inputs without a row per image
    (Flux's token position ids), passed as they are; ``per_step``: the inputs written every step
    (the others follow the conditioning).
    """

    def __init__(
        self,
        compiled: Callable[..., Any],
        max_graphs: int,
        *,
        pairs: int = 2,
        shared: frozenset[str] = frozenset(),
        per_step: tuple[str, ...] = PER_STEP,
        what: str = "UNet",
    ) -> None:
        self._compiled = compiled
        self.pairs, self.shared, self.per_step = pairs, shared, per_step
        self.bound = GraphBound(what, max_graphs)  # keys: (bucket, latent shape, tokens, masked, LoRAs a row)
        self.conditioning_writes = 0  # times a graph's conditioning buffers were written (joins and leaves)
        self._padding: dict[int, tuple[int, Tensor]] = {}  # rows -> (bucket, index of the padded rows)
        self._buffers: dict[tuple, tuple[Any, dict[str, Any]]] = {}  # key -> (conditioning written, buffers)

    @property
    def graphs(self) -> dict[tuple, int]:
        return self.bound.graphs

    @property
    def eager_calls(self) -> int:
        """UNet calls past the bound on graphs, run eager (logged)."""
        return self.bound.eager_calls

    def run(self, **inputs: Any) -> Any:
        return self.bound.run(self._compiled, **inputs)

    def admit(self, n: int, model_in: Tensor, cond: Any) -> tuple | None:
        """The graph these rows run in (one that exists, or a new one within the bound), or None: eager."""
        lora = getattr(cond, "lora", None)  # LoRA rows: their inputs, and how many LoRAs a row has
        key = (
            bucket_rows(n),
            tuple(model_in.shape[1:]),
            cond.embeds.shape[1],
            cond.mask is not None,
            0 if lora is None else lora.slots.shape[1],
            getattr(cond, "control", None) is not None,  # ControlNet residuals as inputs
        )

        def shape() -> str:
            return f"{key[0]} rows (for {n}), latents {'x'.join(map(str, key[1]))}, {key[2]} tokens"

        return key if self.bound.admit(key, shape) else None

    def inputs(self, key: tuple, n: int, inputs: dict[str, Any], cond: Any) -> tuple[int, dict[str, Any]]:
        """The bucket and the graph's buffers, holding ``inputs``' rows padded to it: the per-step
        inputs written now, the conditioning only when it is not the one written last."""
        device = _tensors(inputs)[0].device
        bucket, index = self._bucket(n, device)
        held = self._buffers.get(key)
        rows = {name: value for name, value in inputs.items() if name not in self.shared}
        if held is None:
            buffers = _take_rows(rows, index)
            for tensor in _tensors(buffers):
                torch._dynamo.mark_static_address(tensor)
            self._buffers[key] = (cond, buffers)
            self.conditioning_writes += 1
            return bucket, buffers | {name: inputs[name] for name in self.shared}
        written, buffers = held
        names = [name for name in self.per_step if name in buffers] if cond is written else list(rows)
        for name in names:
            _write_rows(buffers[name], inputs[name], index)
        if cond is not written:
            self._buffers[key] = (cond, buffers)
            self.conditioning_writes += 1
        return bucket, buffers | {name: inputs[name] for name in self.shared}

    def _bucket(self, n: int, device: torch.device) -> tuple[int, Tensor]:
        """The padded row count for ``n`` images and which of the network's ``pairs * n`` rows
        fill its ``pairs * bucket`` (made once per row count, so a step copies nothing to the device)."""
        if n not in self._padding:
            bucket = bucket_rows(n)
            positive = list(range(n)) + [n - 1] * (bucket - n)
            index = torch.tensor([pair * n + i for pair in range(self.pairs) for i in positive], device=device)
            self._padding[n] = bucket, index
        return self._padding[n]


def _take_rows(inputs: dict[str, Any], index: Tensor) -> dict[str, Any]:
    """The UNet's inputs with their rows (dim 0) picked by ``index``, as new tensors; None stays None."""

    def take(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.index_select(0, index)
        if isinstance(value, dict):
            return {key: take(item) for key, item in value.items()}
        if isinstance(value, list | tuple):  # a ControlNet's residuals, one tensor per block
            return [take(item) for item in value]
        return value

    return {name: take(value) for name, value in inputs.items()}


def _write_rows(buffer: Any, value: Any, index: Tensor) -> None:
    """``value``'s rows picked by ``index``, written into ``buffer`` in place."""
    if isinstance(buffer, Tensor):
        torch.index_select(value, 0, index, out=buffer)
    elif isinstance(buffer, dict):
        for key, item in buffer.items():
            _write_rows(item, value[key], index)
    elif isinstance(buffer, list):
        for item, rows in zip(buffer, value, strict=True):
            _write_rows(item, rows, index)


def _tensors(inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        return [t for value in inputs.values() for t in _tensors(value)]
    if isinstance(inputs, list | tuple):
        return [t for value in inputs for t in _tensors(value)]
    return []
