"""The samplers' step over a batch's rows, and its compiled graphs (``engine.compile``).

:func:`advance` is what every step runs after the denoiser: each sampler group's step on its
rows. Eager, the batch calls it on its rows as they are. Compiled, it runs in a graph per (row
bucket, latent size, sampler groups), so a step is the UNet's graph and this one
(:class:`SamplerGraphs`), bounded, counted and logged like the UNet's (:mod:`engine.batching.graphs`).

A compiled step advances the batch's rows **in place**. Under "reduce-overhead" a graph's outputs
live in the memory of its CUDA graph and are overwritten at its next replay, while the batch keeps
``x``, the last denoised latents and the samplers' history from step to step. So the graph returns
nothing: it writes the new state into buffers the batch owns (:class:`StepBuffers`), marked as
static addresses, which CUDA graph trees let a graph mutate, and the batch reads its rows as views
of them. The buffers hold the rows padded to a bucket of :data:`engine.batching.graphs.BUCKETS` (copies of
the last row, whose results nobody reads: samplers never mix rows), so one graph serves every row
count up to its bucket; in a batch of several samplers, each group's row index is padded to a
bucket too, with repeats of its last row, which write the same values twice. Per step the
denoised latents, the rows' plan entries and their pre-drawn noise are copied in; the masked
rows' blend and the groups' indices only when members change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from engine.batching.graphs import GraphBound, bucket_rows
from engine.features.inpaint import LatentBlend
from engine.sampling.samplers import Sampler, plan_state
from engine.sampling.stages import COLUMNS, EVAL, TO

if TYPE_CHECKING:
    from engine.batching.batch import Entry

log = logging.getLogger("engine.families.sd.denoiser")


@dataclass
class SamplerGroup:
    """The rows that one sampler advances (``index`` None: all rows, no gather needed)."""

    sampler: Sampler
    entries: list[Entry]
    index: Tensor | None


def advance(
    groups: Sequence[SamplerGroup],
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    columns: Tensor,
    noise: Tensor | None,
    old_denoised: Tensor | None,
    old_sigma: Tensor | None,
    history: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Every group's sampler step on its rows: ``(x_next, updated history)``. ``columns`` are the
    rows' plan entries, ``[rows, COLUMNS]``; nothing is changed in place."""
    x_next = x if len(groups) == 1 else torch.empty_like(x)
    state = dict(history)  # the updated history replaces the old only once every group is done
    for group in groups:
        pick = (lambda t: t) if group.index is None else (lambda t, i=group.index: t[i])
        drawn = None
        if group.sampler.ancestral or group.sampler.brownian:
            drawn = pick(noise)
        kwargs = dict(old_denoised=pick(old_denoised), old_sigma=pick(old_sigma), noise=drawn)
        if group.sampler.stateful:
            own = {name: pick(history[name]) for name in group.sampler.state}
            advanced, updates = group.sampler.step(
                pick(x), pick(denoised), pick(sigma), pick(sigma_next), **kwargs, state=own | plan_state(pick(columns))
            )
            for name, value in updates.items():
                if group.index is None:
                    state[name] = value
                else:
                    state[name] = state[name].index_copy(0, group.index, value)
        else:
            advanced = group.sampler.step(pick(x), pick(denoised), pick(sigma), pick(sigma_next), **kwargs)
        if group.index is None:
            x_next = advanced
        else:
            x_next[group.index] = advanced
    return x_next, state


@dataclass
class StepBuffers:
    """A batch's rows padded to a bucket, for one graph: the state a step advances in place
    (``x``, ``old_denoised``, ``old_sigma``, ``state``) and what each step copies in."""

    rows: int  # the batch's rows; the buffers hold bucket_rows(rows)
    x: Tensor
    old_denoised: Tensor
    old_sigma: Tensor
    state: dict[str, Tensor]
    denoised: Tensor  # this step's denoised latents
    by_column: Tensor  # [TABLE_COLUMNS, bucket]: this step's plan entries
    noise: Tensor | None  # this step's fresh noise; None when no row draws any
    blend: LatentBlend | None
    groups: tuple[SamplerGroup, ...]  # with row indices padded to buckets
    key: tuple = ()  # (bucket, latent shape, (sampler, padded rows) per group, state names, noise, blend)

    def tensors(self) -> list[Tensor]:
        state = [self.state[name] for name in sorted(self.state)]
        fixed = [self.x, self.old_denoised, self.old_sigma, self.denoised, self.by_column, *state]
        blend = [] if self.blend is None else [self.blend.mask, self.blend.init_latents, self.blend.noise]
        indices = [group.index for group in self.groups if group.index is not None]
        return fixed + ([] if self.noise is None else [self.noise]) + blend + indices

    def write_step(self, denoised: Tensor, by_column: Tensor, noise: Tensor | None) -> None:
        """This step's inputs for the batch's rows (the padding rows keep what they had)."""
        n = self.rows
        self.denoised[:n].copy_(denoised)
        self.by_column[:, :n].copy_(by_column)
        if self.noise is not None:
            self.noise[:n].copy_(noise)


def advance_in_place(buffers: StepBuffers) -> None:
    """One step of every group's sampler on the padded rows, written into the buffers. What the
    samplers return may be a buffer itself (LMS and UniPC shift their history), so the new
    history is copied out (:func:`fresh`) before the first buffer is written."""
    by_column = buffers.by_column
    sigma, sigma_next = by_column[EVAL], by_column[TO]
    x_next, state = advance(
        buffers.groups,
        buffers.x,
        buffers.denoised,
        sigma,
        sigma_next,
        by_column[:COLUMNS].t(),
        buffers.noise,
        buffers.old_denoised,
        buffers.old_sigma,
        buffers.state,
    )
    if buffers.blend is not None:
        x_next = buffers.blend(x_next, sigma_next)
    written = fresh(state)
    buffers.x.copy_(x_next)
    buffers.old_denoised.copy_(buffers.denoised)
    buffers.old_sigma.copy_(sigma)
    for name, value in written.items():
        buffers.state[name].copy_(value)


def fresh(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """``values`` in new memory, as views of one new tensor. Not ``clone()``: inductor drops a
    clone of a graph input and reads the input itself, after the graph has written it
    (pytorch/pytorch#198131, open in 2.14), so LMS's shifted history came out wrong."""
    if not values:
        return {}
    names = list(values)
    flat = torch.cat([values[name].reshape(-1) for name in names])
    parts = flat.split([values[name].numel() for name in names])
    return {name: part.view(values[name].shape) for name, part in zip(names, parts, strict=True)}


class SamplerGraphs:
    """The compiled :func:`advance_in_place`: at most ``max_graphs`` keys, each logged; past the
    bound a step runs it eager, counted in :attr:`eager_steps` and logged."""

    def __init__(self, compiler: Callable[[Callable[..., Any]], Callable[..., Any]], max_graphs: int) -> None:
        self._compiled = compiler(advance_in_place)
        self.bound = GraphBound("sampler", max_graphs)

    @property
    def graphs(self) -> dict[tuple, int]:
        return self.bound.graphs

    @property
    def eager_steps(self) -> int:
        return self.bound.eager_calls

    def run(self, buffers: StepBuffers) -> None:
        key = buffers.key

        def shape() -> str:
            samplers = ", ".join(f"{name} ({rows or 'all'})" for name, rows in key[2])
            return f"{key[0]} rows (for {buffers.rows}), latents {'x'.join(map(str, key[1]))}, samplers {samplers}"

        if self.bound.admit(key, shape):
            self.bound.run(self._compiled, buffers)
        else:
            advance_in_place(buffers)


def lay_out(
    kept: dict[tuple, StepBuffers],
    upload: Callable[[list[int]], Tensor],
    *,
    x: Tensor,
    old_denoised: Tensor,
    old_sigma: Tensor,
    state: dict[str, Tensor],
    by_column: Tensor,
    noise: Tensor | None,
    blend: LatentBlend | None,
    groups: Sequence[tuple[Sampler, list[int] | None]],
) -> StepBuffers:
    """The batch's rows, padded to their bucket, in the buffers for their key: those of ``kept``
    (the batch's, by key) when it has them, so a graph replays on the addresses it was made
    with, else new ones, added to ``kept``. ``upload``: a row index list to the device."""
    n = x.shape[0]
    bucket = bucket_rows(n)
    pad = upload(list(range(n)) + [n - 1] * (bucket - n))
    padded_groups = [
        (sampler, None if rows is None else rows + [rows[-1]] * (bucket_rows(len(rows)) - len(rows)))
        for sampler, rows in groups
    ]
    key = (
        bucket,
        tuple(x.shape[1:]),
        tuple((sampler.name, None if rows is None else len(rows)) for sampler, rows in padded_groups),
        tuple(sorted(state)),
        noise is not None,
        blend is not None,
    )

    def rows_of(t: Tensor | None, dim: int = 0) -> Tensor | None:
        return None if t is None else t.index_select(dim, pad)

    new = StepBuffers(
        rows=n,
        x=rows_of(x),
        old_denoised=rows_of(old_denoised),
        old_sigma=rows_of(old_sigma),
        state={name: rows_of(state[name]) for name in sorted(state)},
        denoised=rows_of(x),  # overwritten before each step; the padding rows only need finite values
        by_column=rows_of(by_column, 1),
        noise=rows_of(noise),
        blend=None
        if blend is None
        else LatentBlend(*(rows_of(t) for t in (blend.mask, blend.init_latents, blend.noise))),
        groups=tuple(
            SamplerGroup(sampler, [], None if rows is None else upload(rows)) for sampler, rows in padded_groups
        ),
        key=key,
    )
    buffers = kept.get(key)
    if buffers is None:
        for tensor in new.tensors():
            torch._dynamo.mark_static_address(tensor)
        kept[key] = new
        return new
    for tensor, written in zip(buffers.tensors(), new.tensors(), strict=True):
        tensor.copy_(written)
    buffers.rows = n  # the same bucket; the group indices (same padded sizes) were copied in place
    return buffers
