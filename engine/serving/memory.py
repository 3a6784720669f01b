"""Device memory: giving it back after a failed call, and row limits after running out of it.

:func:`free_memory` is the one way the engine hands memory back to the allocator (after an
out-of-memory, and when the model pool drops a model). :class:`OutOfMemoryGovernor` is the
worker's memory of what did not fit (issue 5): a step that ran out of memory halves the rows
allowed for its image size; a job that could not even be prepared caps them at what is running;
after :data:`OOM_CALM_STEPS` good steps in a row the lowered limits double back towards
``max_batch``. It decides numbers only; the worker parks and retires the jobs.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from engine.batching.admission import Size, row_limit

#: After running out of GPU memory, lowered row limits double back every this many good steps.
OOM_CALM_STEPS = 50


def free_memory() -> None:
    """Give the allocator back what unreachable tensors held (a failed call's, a dropped model's)."""
    import torch

    gc.collect()  # tracebacks, frames, modules and hooks in reference cycles can hold tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OutOfMemoryGovernor:
    """Row limits per image size, lowered when memory ran out and raised again after calm steps."""

    def __init__(self, max_batch: int, calm_steps: int = OOM_CALM_STEPS) -> None:
        self.max_batch, self.calm_steps = max_batch, calm_steps
        self.lowered: dict[Size, int] = {}
        self._calm = 0

    def limit(self, size: Size) -> int:
        return row_limit(size, self.max_batch, self.lowered)

    def preparing_failed(self, size: Size, running_rows: int) -> None:
        """A job did not fit beside ``running_rows``: nothing more joins until some leave."""
        self.lowered[size] = max(1, running_rows)

    def step_failed(self, size: Size, rows: int) -> int:
        """A step of ``rows`` rows did not fit: the size's new (halved) limit."""
        self.lowered[size] = limit = max(1, rows // 2)
        self._calm = 0
        return limit

    def step_succeeded(self) -> None:
        if not self.lowered:
            return
        self._calm += 1
        if self._calm % self.calm_steps == 0:
            self.lowered = {size: limit * 2 for size, limit in self.lowered.items() if limit * 2 < self.max_batch}


def jobs_to_keep(job_rows: Sequence[int], limit: int) -> int:
    """After an out-of-memory step, how many of the batch's jobs (oldest first) go on within
    ``limit`` rows: at least the oldest, so the batch always moves."""
    keep, kept_rows = 1, job_rows[0]
    while keep < len(job_rows) and kept_rows + job_rows[keep] <= limit:
        kept_rows += job_rows[keep]
        keep += 1
    return keep
