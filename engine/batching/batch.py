"""A running batch: rows of many jobs, each at its own step, advanced by one UNet call per step.

Every image of every job is a row of ``x``. Jobs join and leave between steps; membership changes
rebuild the per-row tables (conditioning, sigma schedules, sampler groups) once, so a step itself
is one denoiser call plus each sampler's arithmetic on its rows, with no host<->device sync
(issue 11 §1). The rebuild lays every row's remaining plan out by *batch* step, on the device:
``table[k]`` holds, for each row, the plan entry it reaches k steps after the rebuild, with the
UNet's timestep and input scale for it (made on the CPU once, so a step computes no
``sigma_to_t``); a step reads ``table[k]`` by a host counter, a view and no kernel. Each job's
fresh noise for its whole run is drawn at admission (:class:`~engine.pipeline.PreparedJob`) and
laid out the same way (:attr:`Batch.noise`).
Masked rows (:mod:`engine.features.inpaint`) add a per-row blend to that rebuild: after each step their
kept area is set back to the init image's latents at the row's next sigma.

A step that raises (out of GPU memory, say) leaves the batch as it was, so the worker can park
some jobs (:meth:`Batch.park`, their rows and step kept) and retry with fewer rows.

A job's engine steps follow its plan (engine.sampling.stages): a second-order sampler's member step is two
engine steps, so :attr:`Entry.step` counts the member's steps (progress) and
:attr:`Entry.engine_step` the UNet calls. Samplers with history keep it per row in
:attr:`Batch.state`, which moves with the rows like ``x``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.batching.graphs import BUCKETS, bucket_rows
from engine.batching.readback import Readback
from engine.batching.sampler_graphs import SamplerGroup, StepBuffers, advance, lay_out
from engine.families.sd.denoiser import Conditioning, Denoiser
from engine.features.inpaint import LatentBlend
from engine.sampling.samplers import Sampler, initial_state
from engine.sampling.schedules import latents_to_decode
from engine.sampling.stages import COLUMNS, EVAL, TO
from engine.types import GenerationRequest

#: Columns the batch adds to a plan's (engine.sampling.stages): the UNet's timestep for the row's sigma,
#: twice (prompt and negative prompt rows: adjacent, so ``table[k][T:T + 2]`` flattened is the
#: UNet's timestep input as a view), and its input scale 1 / sqrt(sigma^2 + 1).
T, C_IN = COLUMNS, COLUMNS + 2
TABLE_COLUMNS = COLUMNS + 3

if TYPE_CHECKING:
    from engine.pipeline import PreparedJob

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """A job inside the batch and how far it has come."""

    job: PreparedJob
    step: int = 0  # the member's steps done (what progress shows)
    engine_step: int = 0  # UNet calls done: more than ``step`` for a second-order sampler

    @property
    def done(self) -> bool:
        return self.engine_step >= self.job.engine_steps


#: The per-row state a job carries from step to step (besides its Entry's step count).
ROW_STATE = ("x", "old_denoised", "old_sigma")


@dataclass
class Parked:
    """A job taken out of the batch mid-run, with its rows' state, to resume where it stopped."""

    entry: Entry
    state: dict[str, Tensor]


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without making the host wait for the GPU's queue (pinned + non_blocking)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Batch:
    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.entries: list[Entry] = []
        self.x: Tensor | None = None  # [rows, C, h, w] float32
        self.old_denoised: Tensor | None = None
        self.old_sigma: Tensor | None = None
        #: [steps left to the longest plan, TABLE_COLUMNS, rows] on the device: row r's plan entry
        #: ``k`` steps after the last membership change at ``[k, :, r]`` (zeros past its end).
        self.table: Tensor | None = None
        self.since_rebuild = 0  # steps taken since the table was laid out: the row of it to read
        #: [steps left, rows, C, h, w]: each row's pre-drawn fresh noise laid out the same way
        #: (zeros for rows that draw none); None when no row draws any.
        self.noise: Tensor | None = None
        self.state: dict[str, Tensor] = {}  # samplers' per-row history, by name (zeros for other rows)
        self.cond: Conditioning | None = None
        self.blend: LatentBlend | None = None  # masked rows' kept areas; None when no row has a mask
        self.groups: list[SamplerGroup] = []
        #: With a compiled denoiser: the rows padded to their bucket, which the sampler graphs
        #: advance in place (``x``, ``old_denoised``, ``old_sigma`` and ``state`` are views of
        #: them); by key, kept so that a graph replays on the addresses it was made with.
        self.buffers: StepBuffers | None = None
        self._buffers: dict[tuple, StepBuffers] = {}

    @property
    def rows(self) -> int:
        return sum(entry.job.rows for entry in self.entries)

    def __contains__(self, entry: Entry) -> bool:
        return any(entry is e for e in self.entries)  # by identity: entries hold tensors

    @property
    def latent_shape(self) -> tuple[int, ...] | None:
        return None if self.x is None else tuple(self.x.shape[1:])

    def offsets(self) -> list[tuple[Entry, slice]]:
        out, start = [], 0
        for entry in self.entries:
            out.append((entry, slice(start, start + entry.job.rows)))
            start += entry.job.rows
        return out

    # ------------------------------------------------------------------ membership

    def add(self, job: PreparedJob) -> None:
        latents = job.latents.float()
        rows, device = job.rows, latents.device
        self._append(
            Entry(job),
            {
                "x": latents,
                "old_denoised": torch.zeros_like(latents),
                "old_sigma": torch.zeros(rows, device=device),
                **initial_state(job.sampler, latents),
            },
        )

    def remove(self, job: PreparedJob) -> Tensor:
        """Take a job's rows out of the batch and return its latents, as the VAE decodes them."""
        return latents_to_decode(self._take(job)[1]["x"], float(job.sigmas[-1]))

    def park(self, job: PreparedJob) -> Parked:
        """Take a job out mid-run; :meth:`resume` puts it back at the same step."""
        return Parked(*self._take(job))

    def resume(self, parked: Parked) -> None:
        self._append(parked.entry, parked.state)

    def _append(self, entry: Entry, state: dict[str, Tensor]) -> None:
        old_rows = 0 if self.x is None else self.x.shape[0]
        self.entries.append(entry)
        for name in ROW_STATE:
            current = getattr(self, name)
            setattr(self, name, state[name] if current is None else torch.cat([current, state[name]]))
        self._append_sampler_state(state, old_rows)
        self._rebuild()

    def _append_sampler_state(self, state: dict[str, Tensor], old_rows: int) -> None:
        """Samplers' history: the union of every member's, zeros where a row's sampler keeps none."""
        names = set(self.state) | (set(state) - set(ROW_STATE))
        new_rows = self.x.shape[0] - old_rows
        for name in names:
            like = self.state[name] if name in self.state else state[name]
            current = self.state.get(name, like.new_zeros((old_rows, *like.shape[1:])))
            joining = state.get(name, like.new_zeros((new_rows, *like.shape[1:])))
            self.state[name] = torch.cat([current, joining])

    def _take(self, job: PreparedJob) -> tuple[Entry, dict[str, Tensor]]:
        ((entry, rows),) = [(e, s) for e, s in self.offsets() if e.job is job]
        state = {name: getattr(self, name)[rows] for name in ROW_STATE}
        state |= {name: self.state[name][rows] for name in entry.job.sampler.state}
        if self.buffers is not None:  # views of buffers that the next steps overwrite
            state = {name: value.clone() for name, value in state.items()}
        self.entries.remove(entry)
        if not self.entries:
            self.x = self.old_denoised = self.old_sigma = self.buffers = None
            self.table, self.noise, self.cond, self.groups, self.state, self.blend = None, None, None, [], {}, None
            return entry, state
        # An index list, not a boolean mask: masking on a GPU waits for the device (nonzero).
        kept = [i for i in range(self.x.shape[0]) if not rows.start <= i < rows.stop]
        keep = to_device(torch.tensor(kept), self.x.device)
        for name in ROW_STATE:
            setattr(self, name, getattr(self, name).index_select(0, keep))
        self.state = {name: value.index_select(0, keep) for name, value in self.state.items()}
        self._rebuild()
        return entry, state

    def _rebuild(self) -> None:
        """Per-row tables for the current members (once per change, not per step)."""
        device = self.x.device
        longest = max(1, *(entry.job.engine_steps - entry.engine_step for entry in self.entries))
        table = torch.zeros(longest, TABLE_COLUMNS, self.rows)
        by_sampler: dict[str, tuple[Sampler, list[Entry], list[int]]] = {}
        for entry, rows in self.offsets():
            remaining = self.denoiser_table(entry.job)[entry.engine_step :]
            table[: len(remaining), :, rows] = remaining[:, :, None]
            sampler, entries, indices = by_sampler.setdefault(entry.job.sampler.name, (entry.job.sampler, [], []))
            entries.append(entry)
            indices.extend(range(rows.start, rows.stop))
        self.table, self.since_rebuild = to_device(table, device), 0
        self.noise = self._lay_out_noise(longest)
        conds = [entry.job.cond for entry in self.entries]
        self.cond = type(conds[0]).cat(conds)  # the family's own conditioning (one model per batch)
        self.blend = LatentBlend.cat(
            [(entry.job.blend, entry.job.rows) for entry in self.entries], tuple(self.x.shape[1:]), device
        )
        whole = len(by_sampler) == 1
        self.groups = [
            SamplerGroup(sampler, entries, None if whole else to_device(torch.tensor(indices), device))
            for sampler, entries, indices in by_sampler.values()
        ]
        if getattr(self.denoiser, "sampler_graphs", None) is not None:
            self._lay_out_buffers([(sampler, None if whole else rows) for sampler, _, rows in by_sampler.values()])

    def _lay_out_buffers(self, groups: list[tuple[Sampler, list[int] | None]]) -> None:
        """The rows into their bucket's buffers, and the batch's state as views of them."""
        buffers = lay_out(
            self._buffers,
            lambda rows: to_device(torch.tensor(rows), self.x.device),
            x=self.x,
            old_denoised=self.old_denoised,
            old_sigma=self.old_sigma,
            state=self.state,
            by_column=self.by_column(),
            noise=None if self.noise is None else self.noise[0],
            blend=self.blend,
            groups=groups,
        )
        n = self.rows
        self.x, self.old_denoised, self.old_sigma = buffers.x[:n], buffers.old_denoised[:n], buffers.old_sigma[:n]
        self.state = {name: value[:n] for name, value in buffers.state.items()}
        self.buffers = buffers

    # ------------------------------------------------------------------ one step

    def _lay_out_noise(self, longest: int) -> Tensor | None:
        """The members' remaining noise by batch step, so a step reads it as a view (one device
        copy per membership change instead of one gather per step)."""
        drawing = [(entry, rows) for entry, rows in self.offsets() if entry.job.noise is not None]
        if not drawing:
            return None
        noise = torch.zeros(longest, self.rows, *self.x.shape[1:], device=self.x.device)
        for entry, rows in drawing:
            remaining = entry.job.noise[entry.engine_step :]
            noise[: len(remaining), rows] = remaining
        return noise

    def denoiser_table(self, job: PreparedJob) -> Tensor:
        """A job's plan with the batch's columns, ``[engine steps, TABLE_COLUMNS]`` on the CPU."""
        sigma = job.plan.table[:, EVAL]
        t = self.denoiser.timesteps(sigma)
        return torch.cat([job.plan.table, t[:, None], t[:, None], self.denoiser.input_scale(sigma)[:, None]], 1)

    def by_column(self) -> Tensor:
        """Every row's plan entry for its current engine step, ``[TABLE_COLUMNS, rows]``: a view."""
        return self.table[self.since_rebuild]

    def sigmas(self) -> tuple[Tensor, Tensor]:
        """Every row's sigma to evaluate the model at, and the sigma its current step goes to."""
        by_column = self.by_column()
        return by_column[EVAL], by_column[TO]

    def step(self) -> Tensor:
        """Advance every row by one step of its own sampler; returns the rows' denoised latents.

        Nothing changes until every part has succeeded: the new state is assigned at the end, or,
        compiled, written by the sampler graph once the UNet is done (a retried step reads the
        same noise, drawn at admission, by the same step counts).
        """
        by_column = self.by_column()
        noise = None if self.noise is None else self.noise[self.since_rebuild]
        if self.buffers is None:
            x_next, denoised, state = self.arithmetic(
                self.x, by_column, noise, self.old_denoised, self.old_sigma, self.state
            )
            self.x, self.old_denoised, self.old_sigma, self.state = x_next, denoised, by_column[EVAL], state
        else:  # compiled: the sampler graph advances the rows in the buffers, which self.x views
            denoised = self.denoise(self.x, by_column)
            self.buffers.write_step(denoised, by_column, noise)
            self.denoiser.sampler_graphs.run(self.buffers)
        self.since_rebuild += 1
        for entry in self.entries:
            entry.step += entry.job.plan.completes[entry.engine_step]
            entry.engine_step += 1
        return denoised

    def arithmetic(
        self,
        x: Tensor,
        by_column: Tensor,
        noise: Tensor | None,
        old_denoised: Tensor | None,
        old_sigma: Tensor | None,
        state: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One step's device work: the denoiser, each group's sampler and the masked rows' blend,
        as ``(x_next, denoised, state)``. A function of its arguments and of what a membership
        change replaces (groups, conditioning, blend), with no host read: the whole of a step that
        ``torch.compile(fullgraph=True)`` can trace as one graph (tests/test_compile.py)."""
        sigma, sigma_next = by_column[EVAL], by_column[TO]
        denoised = self.denoise(x, by_column)
        columns = by_column[:COLUMNS].t()
        x_next, state = advance(
            self.groups, x, denoised, sigma, sigma_next, columns, noise, old_denoised, old_sigma, state
        )
        if self.blend is not None:  # masked rows: outside the mask, the init image at sigma_next
            x_next = self.blend(x_next, sigma_next)
        return x_next, denoised, state

    def denoise(self, x: Tensor, by_column: Tensor) -> Tensor:
        """The rows' denoised latents at their sigmas, the UNet's inputs read from the table."""
        timesteps = by_column[T : T + 2].flatten()  # prompt rows', then negative prompt rows'
        return self.denoiser(x, by_column[EVAL], self.cond, timesteps=timesteps, c_in=by_column[C_IN])

    def nonfinite_check(self) -> NanCheck:
        """Which jobs have a NaN/inf in their rows now, read when it reaches the host (no sync)."""
        return NanCheck(Readback(torch.isfinite(self.x).flatten(1).all(1)), self.offsets())

    def nonfinite_entries(self) -> list[Entry]:
        """Jobs with a NaN/inf in their rows, waiting for the device (tests; the worker uses
        :meth:`nonfinite_check`)."""
        return self.nonfinite_check().bad_entries(wait=True)


@dataclass
class NanCheck:
    """A NaN check's per-row flags on their way to the host, and the rows' owners when it was made."""

    finite: Readback  # [rows] bool
    offsets: list[tuple[Entry, slice]]

    def bad_entries(self, wait: bool = False) -> list[Entry]:
        finite = (self.finite.wait() if wait else self.finite.host).tolist()
        return [entry for entry, rows in self.offsets if not all(finite[rows])]


def rows_of(t: Tensor, picked: list[int]) -> Tensor:
    """Rows ``picked`` of ``t``: a view when they are consecutive, else one stack."""
    if picked == list(range(picked[0], picked[0] + len(picked))):
        return t[picked[0] : picked[0] + len(picked)]
    return torch.stack([t[i] for i in picked])


def capture_graphs(pipeline, sizes: tuple[tuple[int, int], ...], max_batch: int, sampler: str = "euler") -> None:
    """A compiled UNet's graph, and ``sampler``'s step graph (the default sampler's: a batch of
    other samplers makes its own on first use), for every size and row bucket up to
    ``max_batch``, made by two steps of a blank job of that many images
    (``engine.compile_capture = "start"``)."""
    for width, height in sizes:
        for rows in [b for b in BUCKETS if b <= bucket_rows(max_batch)]:
            blank = dict(prompt="", seed=0, steps=2, count=rows, sampler=sampler, width=width, height=height)
            batch = Batch(pipeline.denoiser)
            batch.add(pipeline.prepare(GenerationRequest.of(-1, **blank)))
            while not batch.entries[0].done:
                batch.step()
    log.info("captured %d UNet graphs at start", len(pipeline.denoiser.graphs))
