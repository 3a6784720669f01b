"""A running batch: rows of many jobs, each at its own step, advanced by one UNet call per step.

Every image of every job is a row of ``x``. Jobs join and leave between steps; membership changes
rebuild the per-row tables (conditioning, sigma schedules, sampler groups) once, so a step itself
is one denoiser call plus each sampler's arithmetic on its rows, with no host<->device sync:
the rows' sigmas are read on the device from a table by a step counter kept on the device.

A step that raises (out of GPU memory, say) leaves the batch as it was, so the worker can park
some jobs (:meth:`Batch.park`, their rows and step kept) and retry with fewer rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.denoiser import Conditioning, Denoiser
from engine.samplers import Sampler
from engine.schedules import latents_to_decode

if TYPE_CHECKING:
    from engine.pipeline import PreparedJob


@dataclass
class Entry:
    """A job inside the batch and how far it has come."""

    job: PreparedJob
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.job.total_steps


#: The per-row state a job carries from step to step (besides its Entry's step count).
ROW_STATE = ("x", "old_denoised", "old_sigma", "step_index")


@dataclass
class Parked:
    """A job taken out of the batch mid-run, with its rows' state, to resume where it stopped."""

    entry: Entry
    state: dict[str, Tensor]


@dataclass
class SamplerGroup:
    """The rows that one sampler advances (``index`` None: all rows, no gather needed)."""

    sampler: Sampler
    entries: list[Entry]
    index: Tensor | None


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
        self.step_index: Tensor | None = None  # [rows] long, on the device
        self.sigma_table: Tensor | None = None  # [rows, longest schedule], zero-padded
        self.cond: Conditioning | None = None
        self.groups: list[SamplerGroup] = []

    @property
    def rows(self) -> int:
        return sum(entry.job.rows for entry in self.entries)

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
        self._append(Entry(job), {
            "x": latents,
            "old_denoised": torch.zeros_like(latents),
            "old_sigma": torch.zeros(rows, device=device),
            "step_index": torch.zeros(rows, device=device, dtype=torch.long),
        })

    def remove(self, job: PreparedJob) -> Tensor:
        """Take a job's rows out of the batch and return its latents, as the VAE decodes them."""
        return latents_to_decode(self._take(job)[1]["x"], float(job.sigmas[-1]))

    def park(self, job: PreparedJob) -> Parked:
        """Take a job out mid-run; :meth:`resume` puts it back at the same step."""
        return Parked(*self._take(job))

    def resume(self, parked: Parked) -> None:
        self._append(parked.entry, parked.state)

    def _append(self, entry: Entry, state: dict[str, Tensor]) -> None:
        self.entries.append(entry)
        for name in ROW_STATE:
            current = getattr(self, name)
            setattr(self, name, state[name] if current is None else torch.cat([current, state[name]]))
        self._rebuild()

    def _take(self, job: PreparedJob) -> tuple[Entry, dict[str, Tensor]]:
        (entry, rows), = [(e, s) for e, s in self.offsets() if e.job is job]
        state = {name: getattr(self, name)[rows] for name in ROW_STATE}
        self.entries.remove(entry)
        if not self.entries:
            self.x = self.old_denoised = self.old_sigma = self.step_index = None
            self.sigma_table, self.cond, self.groups = None, None, []
            return entry, state
        # An index list, not a boolean mask: masking on a GPU waits for the device (nonzero).
        kept = [i for i in range(self.x.shape[0]) if not rows.start <= i < rows.stop]
        keep = to_device(torch.tensor(kept), self.x.device)
        for name in ROW_STATE:
            setattr(self, name, getattr(self, name).index_select(0, keep))
        self._rebuild()
        return entry, state

    def _rebuild(self) -> None:
        """Per-row tables for the current members (once per change, not per step)."""
        device = self.x.device
        longest = max(len(entry.job.sigmas) for entry in self.entries)
        table = torch.zeros(self.rows, longest)
        by_sampler: dict[str, tuple[Sampler, list[Entry], list[int]]] = {}
        for entry, rows in self.offsets():
            table[rows, : len(entry.job.sigmas)] = entry.job.sigmas
            sampler, entries, indices = by_sampler.setdefault(entry.job.sampler.name, (entry.job.sampler, [], []))
            entries.append(entry)
            indices.extend(range(rows.start, rows.stop))
        self.sigma_table = to_device(table, device)
        self.cond = Conditioning.cat([entry.job.cond for entry in self.entries])
        whole = len(by_sampler) == 1
        self.groups = [
            SamplerGroup(sampler, entries, None if whole else to_device(torch.tensor(indices), device))
            for sampler, entries, indices in by_sampler.values()
        ]

    # ------------------------------------------------------------------ one step

    def sigmas(self) -> tuple[Tensor, Tensor]:
        """Every row's current and next sigma, read on the device."""
        here = self.step_index[:, None]
        return self.sigma_table.gather(1, here)[:, 0], self.sigma_table.gather(1, here + 1)[:, 0]

    def step(self) -> Tensor:
        """Advance every row by one step of its own sampler; returns the rows' denoised latents.

        Nothing changes until every part has succeeded: the new state is assigned at the end, and
        the ancestral generators are rewound if a later part fails, so a retried step draws the
        same noise.
        """
        sigma, sigma_next = self.sigmas()
        denoised = self.denoiser(self.x, sigma, self.cond)
        generators = [g for group in self.groups if group.sampler.ancestral
                      for entry in group.entries for g in entry.job.generators]
        rewind = [(g, g.get_state()) for g in generators]  # CPU generators: no device sync
        try:
            x_next = self._advance(denoised, sigma, sigma_next)
        except BaseException:
            for g, state in rewind:
                g.set_state(state)
            raise
        self.x, self.old_denoised, self.old_sigma = x_next, denoised, sigma
        self.step_index = self.step_index + 1
        for entry in self.entries:
            entry.step += 1
        return denoised

    def _advance(self, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        x_next = self.x if len(self.groups) == 1 else torch.empty_like(self.x)
        for group in self.groups:
            noise = None
            if group.sampler.ancestral:
                noise = to_device(torch.cat([entry.job.ancestral_noise() for entry in group.entries]), self.x.device)
            pick = (lambda t: t) if group.index is None else (lambda t, i=group.index: t[i])
            advanced = group.sampler.step(
                pick(self.x), pick(denoised), pick(sigma), pick(sigma_next),
                old_denoised=pick(self.old_denoised), old_sigma=pick(self.old_sigma), noise=noise,
            )
            if group.index is None:
                x_next = advanced
            else:
                x_next[group.index] = advanced
        return x_next

    def nonfinite_entries(self) -> list[Entry]:
        """Jobs with a NaN/inf in their rows (one host sync: call every few steps, not every step)."""
        bad = (~torch.isfinite(self.x)).flatten(1).any(1).tolist()
        return [entry for entry, rows in self.offsets() if any(bad[rows])]
