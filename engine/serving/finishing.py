"""After the device is done with a job: decoding, then everything else off the engine thread.

The engine thread's last work for a finished job is the batched VAE decode
(:func:`decode_finished`: one NaN check, one decode for every job that finished at this step,
one image at a time after running out of memory). Everything after it (the uint8 conversion and
the copy to the host, PNG encoding with the metadata, and each progress preview's PNG) runs in
a small thread pool (:class:`Finisher`), so the engine thread launches the next step at once
instead of leaving the GPU idle while zlib runs (issue 11). A preview's pixels come to the host
by a copy nobody waits for (:mod:`engine.batching.readback`); its PNG is started once the engine thread,
polling at a step boundary, sees that the copy has landed.

A job's deliveries (progress, previews, its result or its error) still reach it in the order
they were made: each one is handed over only after the one before it, whatever thread encodes
it. A delivery with nothing to encode, behind nothing pending, is handed over at once on the
engine thread, as before.

The image filter (issue 24) does not run here but in the bot process, on a thread of its own
(``bot/safety/classifier.py`` says why): workers in other processes or machines make results
it must judge too, uploads are judged before a job exists, and the engine never waits for it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.batching.readback import Readback
from engine.errors import EngineError, GenerationError
from engine.features.hires import SecondPass, second_pass_steps
from engine.pipeline import DECODE_CHUNK, decode_error, nan_error, out_of_memory_error, to_images
from engine.preview import preview_png
from engine.serving.memory import free_memory
from engine.types import GenerationRequest, GenerationResult, Progress

if TYPE_CHECKING:
    from engine.batching.batch import Entry
    from engine.pipeline import Pipeline, PreparedJob

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
    delivered: concurrent.futures.Future | None = None  # done when its latest delivery was handed over
    order: int = 0  # its place in the arrival order, which a hires job's second pass keeps
    second_pass: SecondPass | None = None  # a hires job between or in its second pass

    @property
    def size(self) -> tuple[int, int]:
        """The size of the pass it waits for or runs (a batch holds one size)."""
        if self.second_pass is not None:
            return self.second_pass.size
        return self.request.params.width, self.request.params.height

    @property
    def pass_request(self) -> GenerationRequest:
        """The request of the pass it waits for or runs (a hires job's second: at the hires size)."""
        return self.request if self.second_pass is None else self.second_pass.request

    @property
    def needs_second_pass(self) -> bool:
        return self.request.params.is_hires and self.second_pass is None

    def progress(self, step: int, total: int) -> Progress:
        """``step`` of ``total`` of the running pass, counted over both passes of a hires job."""
        if self.second_pass is not None:
            before = self.second_pass.steps_before
            return Progress(self.request.job_id, before + step, before + total)
        return Progress(self.request.job_id, step, total + second_pass_steps(self.request.params))

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


@dataclass(frozen=True)
class Preview:
    """One image's preview latents: row ``index`` of a step's batched device->host copy."""

    latents: Readback
    index: int
    family: str


#: A finished job's decoded pixels (float, on the device) and which images are invalid.
Pixels = tuple[torch.Tensor, torch.Tensor]
#: Threads that encode PNGs: zlib releases the GIL, and a few keep up with a GPU.
ENCODE_THREADS = 2


def decode_finished(
    pipeline: Pipeline, finished: list[tuple[Entry, torch.Tensor]], chunk_size: int = DECODE_CHUNK
) -> list[tuple[Entry, Pixels | EngineError]]:
    """Each finished job's decoded pixels, or the error it fails with (NaN latents, a failed VAE)."""
    stacked = torch.cat([latents for _, latents in finished])
    finite_rows = torch.isfinite(stacked).flatten(1).all(1).tolist()
    outcomes: list[tuple[Entry, Pixels | EngineError]] = []
    good, start = [], 0
    for entry, latents in finished:
        rows = entry.job.rows
        if all(finite_rows[start : start + rows]):
            good.append((entry, latents))
        else:
            outcomes.append((entry, nan_error(entry.job)))
        start += rows
    if not good:
        return outcomes
    try:
        decoded = decode(pipeline, torch.cat([latents for _, latents in good]), chunk_size)
    except Exception as e:
        log.exception("VAE decode failed")
        error = GenerationError(f"Decoding the image failed ({type(e).__name__}).")
        return outcomes + [(entry, error) for entry, _ in good]
    start = 0
    for entry, _ in good:
        if decoded is None:
            outcomes.append((entry, out_of_memory_error(entry.job.request)))
            continue
        rows = slice(start, start + entry.job.rows)
        outcomes.append((entry, (decoded[0][rows], decoded[1][rows])))
        start = rows.stop
    return outcomes


def decode(pipeline: Pipeline, latents: torch.Tensor, chunk_size: int = DECODE_CHUNK) -> Pixels | None:
    """Decode ``chunk_size`` images at a time, one at a time after running out of memory; None if
    even that does not fit."""
    for size in dict.fromkeys((chunk_size, 1)):
        try:
            return pipeline.decode_pixels(latents, size)
        except torch.OutOfMemoryError:
            log.warning("out of GPU memory decoding %d image(s), %d at a time", len(latents), size)
        free_memory()
    return None


class Finisher:
    """Encodes results and previews in a thread pool and hands each job's over in order.

    Called from the engine thread only (one writer of each ticket's ``delivered``); :meth:`close`
    waits for what is being encoded, and a later delivery starts a new pool.
    """

    def __init__(self, compress_level: int, threads: int = ENCODE_THREADS) -> None:
        self.compress_level, self.threads = compress_level, threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # Work waiting for its device->host copy, in the order the copies were made (so in the
        # order they land): the engine thread's own, polled at each step boundary.
        self._unread: collections.deque[tuple[Readback, Callable[[], Any], concurrent.futures.Future]] = (
            collections.deque()
        )

    def progress(self, ticket: Ticket, progress: Progress, preview: Preview | None) -> None:
        """Report ``progress``, with a PNG of ``preview``'s latents once they reach the host."""
        if preview is None:
            self._deliver(ticket, None, lambda _: ticket.report(progress))
            return
        self._deliver(
            ticket,
            lambda: preview_png(preview.latents.host[preview.index], preview.family),
            lambda png: ticket.report(dataclasses.replace(progress, preview=png)),
            after=preview.latents,
        )

    def poll(self) -> None:
        """Start the work whose device->host copies have landed (the engine thread, each step)."""
        while self._unread and self._unread[0][0].ready():
            self._start_read(*self._unread.popleft())

    def flush(self) -> None:
        """Wait for every pending copy and start its work (the device is idle: nothing is running)."""
        while self._unread:
            readback, work, computed = self._unread.popleft()
            readback.wait()
            self._start_read(readback, work, computed)

    def result(self, ticket: Ticket, pipeline: Pipeline, job: PreparedJob, pixels: Pixels) -> None:
        """Turn a finished job's pixels into its PNGs, then settle its ticket with them."""

        def encode() -> tuple[GenerationResult | None, EngineError | None]:
            try:
                images = to_images(*pixels)
                if None in images:
                    return None, decode_error(job)
                return pipeline.finish(job, images, self.compress_level), None
            except Exception as e:
                log.exception("finishing job %s failed", job.request.job_id)
                return None, GenerationError(f"Saving the image failed ({type(e).__name__}).")

        self._deliver(ticket, encode, lambda outcome: ticket.settle(*outcome))

    def encoded(self, ticket: Ticket, encode: Callable[[], GenerationResult]) -> None:
        """Settle a ticket with what ``encode`` makes in the pool (a job that needed no decode)."""

        def work() -> tuple[GenerationResult | None, EngineError | None]:
            try:
                return encode(), None
            except Exception as e:
                log.exception("finishing job %s failed", ticket.request.job_id)
                return None, GenerationError(f"Saving the image failed ({type(e).__name__}).")

        self._deliver(ticket, work, lambda outcome: ticket.settle(*outcome))

    def fail(self, ticket: Ticket, error: BaseException) -> None:
        """Settle a ticket with ``error``, after whatever it has pending."""
        self._deliver(ticket, None, lambda _: ticket.settle(error=error))

    def close(self) -> None:
        """Wait until everything submitted is encoded and handed over."""
        self.flush()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _deliver(
        self,
        ticket: Ticket,
        work: Callable[[], Any] | None,
        hand_over: Callable[[Any], None],
        after: Readback | None = None,
    ) -> None:
        """Run ``work`` in the pool (None: nothing to compute) once ``after`` has reached the host,
        then ``hand_over`` its value once every earlier delivery of this ticket has been handed over."""
        previous = ticket.delivered
        if work is None and (previous is None or previous.done()):
            hand_over(None)  # nothing to wait for: at once, on the engine thread
            return
        delivered = ticket.delivered = concurrent.futures.Future()
        if work is None:
            computed = _done(None)
        elif after is None or (not self._unread and after.ready()):
            computed = self._submit(work)
        else:
            computed = concurrent.futures.Future()
            self._unread.append((after, work, computed))

        def finish(done: concurrent.futures.Future) -> None:
            try:
                hand_over(done.result())
            except Exception:  # a faulty callback must not stop the job's later deliveries
                log.exception("delivering to job %s failed", ticket.request.job_id)
            finally:
                delivered.set_result(None)

        def after_previous(_: object = None) -> None:
            computed.add_done_callback(finish)

        if previous is None:
            after_previous()
        else:
            previous.add_done_callback(after_previous)

    def _start_read(self, readback: Readback, work: Callable[[], Any], computed: concurrent.futures.Future) -> None:
        def copy(done: concurrent.futures.Future) -> None:
            if done.exception() is not None:
                computed.set_exception(done.exception())
            else:
                computed.set_result(done.result())

        self._submit(work).add_done_callback(copy)

    def _submit(self, work: Callable[[], Any]) -> concurrent.futures.Future:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="engine-encode")
            return self._pool.submit(_in_inference_mode, work)


def _in_inference_mode(work: Callable[[], Any]) -> Any:
    with torch.inference_mode():  # the engine thread's tensors are inference tensors; mode is per thread
        return work()


def _done(value: Any) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future
