"""Which waiting jobs join the running batch at a step boundary: the policy, as pure functions.

A batch holds one image size and one model (its *key*, :func:`engine.serving.models.batch_key`; a LoRA set
that cannot run per row too, :meth:`engine.features.lora.LoraLibrary.batch_part`)
and at most a row limit of rows (``engine.max_batch``, lowered for a size after running out of
memory, :class:`engine.serving.memory.OutOfMemoryGovernor`). Waiting jobs are looked at in arrival order:

- one that fits joins;
- one of another size or key is stepped over, so the jobs behind it may join in its place (mixed
  sizes would otherwise run one job at a time), but only until it has waited
  ``engine.overtake_window`` seconds: then nothing more joins, the batch drains and it goes next;
- once a job would take the batch over its row limit, it and everything behind it keep their
  order (a job always joins an empty batch, however many rows it has);
- jobs parked after an out-of-memory are older than any waiting job: while one is parked, no
  waiting job joins, and parked jobs rejoin first, oldest first, as the row limit allows.

Plain values in, indices out: no torch, no threads, no clock (``now`` is passed), so every rule
has a unit test of its own (``tests/test_admission.py``) and the worker only applies the answer.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.params import HIRES_UPSCALERS

if TYPE_CHECKING:
    from engine.config.settings import GenerationSettings
    from engine.params import GenerationParams

Size = tuple[int, int]


@dataclass(frozen=True)
class Waiting:
    """A waiting job as the policy sees it."""

    size: Size
    key: Hashable  # model, tiling, a LoRA set that runs whole: jobs share a batch only with equal keys
    rows: int  # images it adds to the batch
    arrived: float  # on the worker's clock


@dataclass(frozen=True)
class Running:
    """The running batch as the policy sees it (``size`` and ``key`` None when it is empty)."""

    rows: int = 0
    size: Size | None = None
    key: Hashable | None = None
    parked: int = 0  # jobs parked after an out-of-memory, waiting to resume


def row_limit(size: Size, max_batch: int, lowered: Mapping[Size, int]) -> int:
    """Rows a batch of ``size`` may hold: ``max_batch``, or less after running out of memory."""
    return min(max_batch, lowered.get(size, max_batch))


def admissions(
    waiting: Sequence[Waiting],
    running: Running,
    *,
    max_batch: int,
    lowered: Mapping[Size, int],
    overtake_window: float,
    now: float,
) -> list[int]:
    """Indices into ``waiting`` (arrival order) of the jobs that join the batch now, in order."""
    if running.parked:
        return []  # parked jobs are older: none overtakes them
    rows, size, key = running.rows, running.size, running.key
    taken: list[int] = []
    for index, job in enumerate(waiting):
        if size is None:  # an empty batch takes the first job's size and key
            size, key = job.size, job.key
        if job.size != size or job.key != key:
            if now - job.arrived >= overtake_window:
                break
            continue
        if rows and rows + job.rows > row_limit(size, max_batch, lowered):
            break
        taken.append(index)
        rows += job.rows
    return taken


def resumptions(parked_rows: Sequence[int], running_rows: int, limit: int) -> int:
    """How many parked jobs (oldest first, ``parked_rows`` each) rejoin a batch of ``running_rows``.

    They all have the batch's size (they were parked from it, and nothing else joined since);
    the first always rejoins an empty batch.
    """
    count = 0
    for rows in parked_rows:
        if running_rows and running_rows + rows > limit:
            break
        running_rows += rows
        count += 1
    return count


def over_limits(params: GenerationParams, gen: GenerationSettings, models: Collection[str] = ()) -> str | None:
    """Why the device refuses a job, or None. The Discord boundary checks requests first; this
    only guards the device against one that slipped by. ``models``: the upscaler models the
    hires fix may use besides the built-in upscalers."""
    if not 1 <= params.steps <= gen.max_steps:
        return f"steps must be 1 to {gen.max_steps}"
    if params.width > gen.max_width or params.height > gen.max_height:
        return f"size must be at most {gen.max_width}x{gen.max_height}"
    if not 1 <= params.count <= gen.max_count:
        return f"count must be 1 to {gen.max_count}"
    return hires_over_limits(params, gen, models) if params.is_hires else None


def hires_over_limits(params: GenerationParams, gen: GenerationSettings, models: Collection[str] = ()) -> str | None:
    """The hires fix's limits: its size within the server's, each pass's steps within ``max_steps``."""
    width, height = params.hires_size
    if width > gen.max_width or height > gen.max_height:
        return f"the hires size {width}x{height} must be at most {gen.max_width}x{gen.max_height}"
    if not 1 <= params.hires_pass_steps <= gen.max_steps:
        return f"hires steps must be 1 to {gen.max_steps}"
    if not 0 < params.hires_strength <= 1:
        return "the hires denoising strength must be above 0 and at most 1"
    if params.hires_upscaler not in HIRES_UPSCALERS and params.hires_upscaler not in models:
        known = ", ".join((*HIRES_UPSCALERS, *models))
        return f"unknown hires upscaler {params.hires_upscaler!r}; use one of {known}"
    return None
