"""After a job's last step: its latents decoded into images, and where its answer goes.

:class:`Ticket` is a submitted job with its future and progress callback. :func:`decode_finished`
turns the jobs that finished at one step into images with one NaN check and one batched VAE
decode (one image at a time after running out of memory), or into the error each job fails with.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.errors import EngineError, GenerationError
from engine.memory import free_memory
from engine.pipeline import DECODE_CHUNK, decode_error, nan_error, out_of_memory_error
from engine.types import GenerationRequest, GenerationResult, Progress

if TYPE_CHECKING:
    from PIL import Image

    from engine.batch import Entry
    from engine.pipeline import Pipeline

log = logging.getLogger(__name__)

ProgressSink = Callable[[Progress], None]


@dataclass(eq=False)
class Ticket:
    """A submitted request and where its result and progress go."""

    request: GenerationRequest
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    notify: ProgressSink | None = None  # already thread-safe for its receiver
    cancelled: bool = False
    deadline: float = math.inf  # on the worker's clock, set when the worker starts the job
    arrived: float = 0.0  # on the worker's clock, when it was submitted

    @property
    def size(self) -> tuple[int, int]:
        return self.request.params.width, self.request.params.height

    def settle(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # the awaiting side gave up (its task was cancelled) before we finished

    def report(self, progress: Progress) -> None:
        try:
            self.notify(progress)
        except Exception:  # a closed loop or a faulty callback must not stop other members' jobs
            log.exception("progress callback for job %s failed", progress.job_id)


Decoded = list["Image.Image"] | EngineError


def decode_finished(pipeline: Pipeline, finished: list[tuple[Entry, torch.Tensor]]) -> list[tuple[Entry, Decoded]]:
    """Each finished job's images, or the error it fails with (NaN latents, a VAE that failed)."""
    stacked = torch.cat([latents for _, latents in finished])
    finite_rows = torch.isfinite(stacked).flatten(1).all(1).tolist()
    outcomes: list[tuple[Entry, Decoded]] = []
    good, start = [], 0
    for entry, latents in finished:
        rows = entry.job.rows
        if all(finite_rows[start:start + rows]):
            good.append((entry, latents))
        else:
            outcomes.append((entry, nan_error(entry.job)))
        start += rows
    if not good:
        return outcomes
    try:
        images = decode(pipeline, torch.cat([latents for _, latents in good]))
    except Exception as e:
        log.exception("VAE decode failed")
        error = GenerationError(f"Decoding the image failed ({type(e).__name__}).")
        return outcomes + [(entry, error) for entry, _ in good]
    for entry, _ in good:
        if images is None:
            outcomes.append((entry, out_of_memory_error(entry.job.request)))
            continue
        mine, images = images[: entry.job.rows], images[entry.job.rows :]
        outcomes.append((entry, decode_error(entry.job) if None in mine else mine))
    return outcomes


def decode(pipeline: Pipeline, latents: torch.Tensor) -> list[Image.Image | None] | None:
    """Decode, one image at a time after running out of memory; None if even that does not fit."""
    for chunk_size in (DECODE_CHUNK, 1):
        try:
            return pipeline.decode(latents, chunk_size)
        except torch.OutOfMemoryError:
            log.warning("out of GPU memory decoding %d image(s), %d at a time", len(latents), chunk_size)
        free_memory()
    return None
