"""What the engine worker does when a job or the device fails: the thread never stops for it (issue 5).

- Out of GPU memory in a step: the step left the batch as it was, so the worker frees memory,
  parks the newer jobs (their state kept) and goes on with the older ones, under the lowered row
  limit of :class:`engine.serving.memory.OutOfMemoryGovernor`. Only a job that does not fit even alone
  fails, with a message saying what to ask for instead.
- NaN or inf in a job's latents (looked for every few steps, read without waiting for the
  device): that job fails, the others go on. Bad images from a float16/bfloat16 VAE are decoded
  again in float32 (:mod:`engine.vae`).
- ``engine.job_timeout``: a job running longer fails at the next step boundary, read from a
  monotonic clock (injectable, for tests). Cancelled jobs leave at the same boundary.

A mixin of :class:`engine.serving.worker.EngineWorker`, whose state it uses (its batch's entries, the
parked jobs, the tickets), kept apart so that the worker's module holds the batching itself.
"""

from __future__ import annotations

import logging

from engine.batching.batch import Batch, Entry
from engine.errors import EngineError, JobCancelled
from engine.pipeline import nan_error, out_of_memory_error, timeout_error
from engine.serving.memory import free_memory, jobs_to_keep

log = logging.getLogger("engine.serving.worker")  # the worker's log, as before the split


class FaultHandling:
    """Cancel, time limits, NaN isolation and out-of-memory recovery of the running batch."""

    def _drop_stopped(self, batch: Batch) -> None:
        """Jobs cancelled or past their time limit leave at this step boundary, parked ones too."""
        now = self.clock()
        for entry in list(batch.entries):
            if (error := self._stop_reason(entry, now)) is not None:
                self._retire(batch, entry, error=error)
        for parked in list(self._parked):
            if (error := self._stop_reason(parked.entry, now)) is not None:
                self._parked.remove(parked)
                self._settle(parked.entry, error=error)

    def _stop_reason(self, entry: Entry, now: float) -> EngineError | None:
        ticket = self._active[id(entry.job)]
        if ticket.cancelled:
            return JobCancelled(f"Job {ticket.request.job_id} was cancelled.")
        if now > ticket.deadline:
            log.warning(
                "job %s passed the %g s time limit at step %d of %d",
                ticket.request.job_id,
                self.settings.job_timeout,
                entry.step,
                entry.job.total_steps,
            )
            return timeout_error(ticket.request, self.settings.job_timeout)
        return None

    def _out_of_memory(self, batch: Batch) -> None:
        """A step did not fit (and changed nothing): go on with the older half of the rows.

        The newer jobs are parked with their state and rejoin as the lowered limit allows; a job
        alone in the batch cannot be made smaller, so it fails with a message saying so.
        """
        free_memory()
        size, rows = self._batch_size(batch), batch.rows
        limit = self.memory.step_failed(size, rows)
        if len(batch.entries) == 1:
            entry = batch.entries[0]
            log.warning("out of GPU memory for job %s alone (%d rows of %dx%d)", entry.job.request.job_id, rows, *size)
            self._retire(batch, entry, error=out_of_memory_error(entry.job.request))
            return
        keep = jobs_to_keep([entry.job.rows for entry in batch.entries], limit)
        kept_rows = sum(entry.job.rows for entry in batch.entries[:keep])
        parking = batch.entries[keep:]
        log.warning(
            "out of GPU memory at %d rows of %dx%d; going on with %d, parking jobs %s",
            rows,
            *size,
            kept_rows,
            [entry.job.request.job_id for entry in parking],
        )
        self._parked[:0] = [batch.park(entry.job) for entry in parking]

    def _read_nan_checks(self, batch: Batch) -> None:
        """Jobs whose NaN check has reached the host and found one fail (if they are still here)."""
        while self._nan_checks and self._nan_checks[0].finite.ready():
            for entry in [e for e in self._nan_checks.popleft().bad_entries() if e in batch]:
                self._retire(batch, entry, error=nan_error(entry.job))
