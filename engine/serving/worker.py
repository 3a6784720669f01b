"""The engine worker: one thread owns the model and the device, and keeps a running batch.

Continuous batching (issue 4): between two denoising steps the thread admits the waiting jobs
that :func:`engine.batching.admission.admissions` lets join (same size and model, within the row
limit, with the overtake window), and retires the jobs that just took their last step (one
batched VAE decode; their PNGs are made off this thread, :mod:`engine.serving.finishing`). It switches
model only between batches, loading models on demand through a
:class:`~engine.serving.models.ModelPool`. Jobs in a batch may differ in everything else (prompt, seed,
steps, sampler, guidance, txt2img or img2img, LoRA set: :mod:`engine.features.lora_slots`), and a job's
pixels do not depend on what shared its batch: its noise comes from its own seeds and every per-row
quantity is computed row by row.

asyncio code awaits :meth:`EngineWorker.generate`; results and progress reach the event loop
thread-safely (``loop.call_soon_threadsafe`` and ``asyncio.wrap_future``). Cancelling takes a job
out at the next step boundary; a fault in one job (a NaN, a bad init image) fails that job only.

Faults of the device do not stop the thread (issue 5): :mod:`engine.serving.worker_faults`.

A hires fix job (:mod:`engine.features.hires`) goes back in line when its first pass is done, at its
enlarged size and its old place, and comes back as an img2img job (each pass has the time limit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import torch

from engine.batching.admission import Running, Waiting, admissions, over_limits, resumptions
from engine.batching.batch import Batch, Entry, NanCheck, Parked, capture_graphs, rows_of
from engine.batching.readback import Readback
from engine.config.upscaler_settings import UpscalerSettings
from engine.errors import EngineError, GenerationError, JobCancelled
from engine.features.hires import after_first_pass, is_latent, prepare_second_pass
from engine.features.lora import SlotsBusy, batch_part
from engine.features.upscale_jobs import upscale_alone, upscaled_init
from engine.features.upscalers import Upscalers
from engine.pipeline import Pipeline, out_of_memory_error, to_images
from engine.serving.finishing import Finisher, Preview, ProgressSink, Ticket, decode_finished
from engine.serving.memory import OutOfMemoryGovernor, free_memory
from engine.serving.models import ModelPool, batch_key
from engine.serving.worker_faults import FaultHandling
from engine.types import GenerationRequest, GenerationResult, Progress

if TYPE_CHECKING:
    from engine.config.settings import EngineSettings, GenerationSettings
    from engine.families.loading import LoadedModel

log = logging.getLogger(__name__)

#: Look for NaN/inf in the running batch every this many steps (read when it reaches the host).
NAN_CHECK_EVERY = 8


class EngineWorker(FaultHandling):
    """Runs generation requests on one thread, batching jobs of different members together."""

    def __init__(
        self,
        model: LoadedModel | ModelPool,
        settings: EngineSettings,
        gen: GenerationSettings,
        *,
        upscalers: UpscalerSettings | Upscalers | None = None,
        clock: Callable[[], float] = time.monotonic,
        compiler: Callable[[torch.nn.Module], Callable] | None = None,
    ) -> None:
        """``model``: one loaded model, or a :class:`ModelPool` of several (its default is loaded now);
        ``upscalers``: ``[upscalers]`` (its default is loaded now); None: Lanczos only;
        ``compiler``: compiles the UNet when ``engine.compile`` is on (default: torch.compile)."""
        self.settings, self.gen = settings, gen
        self.clock = clock
        self._compiler = compiler
        self.models = model if isinstance(model, ModelPool) else ModelPool.single(model)
        self.model_name: str | None = self.models.default  # the model of the running batch
        self.pipeline: Pipeline | None = self._compiled(self.models.pipeline(self.model_name))
        if self.pipeline is not None:  # SDXL, SD 3.5, Flux: their native sizes (generation.sdxl_sizes) are allowed
            info = self.pipeline.model.info
            self.gen = gen.for_family(info.family, info.guidance)
        if not isinstance(upscalers, Upscalers):
            upscalers = Upscalers.configured(upscalers or UpscalerSettings(), self.pipeline.device, self.pipeline.dtype)
        self.upscalers = upscalers  # the U buttons' upscalers, on this thread's device
        self._lock = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._admitting: list[Ticket] = []  # taken from the queue, being prepared
        self._active: dict[int, Ticket] = {}  # id(PreparedJob) -> its ticket
        # The worker thread's own: jobs parked after an out-of-memory (they go before any waiting
        # job), and the row limits per image size that memory allows.
        self._parked: list[Parked] = []
        self.memory = OutOfMemoryGovernor(settings.max_batch)
        self.finisher = Finisher(settings.png_compress_level)  # PNGs and previews, off this thread
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_rows = 0  # rows of the running batch (images denoised together), for the metrics
        self._steps = itertools.count(1)
        self._arrivals = itertools.count()  # tickets' places in the arrival order
        self._nan_checks: deque[NanCheck] = deque()  # on their way to the host, oldest first

    # ------------------------------------------------------------------ API (any thread)

    def start(self) -> None:
        """Start the thread that owns the model and the device."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Cancel every job (they raise JobCancelled) and join the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.finisher.close()  # results being encoded are delivered
        self._cancel_waiting()

    async def generate(self, request: GenerationRequest, on_progress: ProgressSink | None = None) -> GenerationResult:
        """Await one job's images; ``on_progress`` runs on this event loop's thread."""
        loop = asyncio.get_running_loop()
        notify = None
        if on_progress is not None:

            def notify(progress: Progress) -> None:
                loop.call_soon_threadsafe(on_progress, progress)

        future = self._submit(request, notify)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.cancel(request.job_id)
            raise

    def generate_blocking(
        self, request: GenerationRequest, on_progress: ProgressSink | None = None
    ) -> GenerationResult:
        """Run one job from a plain thread (the CLI); ``on_progress`` runs on the worker thread, or
        on an encoding thread for a progress with a preview (one at a time, in order)."""
        return self._submit(request, on_progress).result()

    def cancel(self, job_id: int) -> bool:
        """Stop job ``job_id`` at the next step boundary; False if it is not here."""
        with self._lock:
            found = False
            for ticket in [t for t in self._waiting if t.request.job_id == job_id]:
                self._waiting.remove(ticket)
                ticket.settle(error=JobCancelled(f"Job {job_id} was cancelled."))
                found = True
            for ticket in [*self._admitting, *self._active.values()]:
                if ticket.request.job_id == job_id:
                    ticket.cancelled = found = True
            return found

    def _submit(self, request: GenerationRequest, notify: ProgressSink | None) -> concurrent.futures.Future:
        ticket = Ticket(request, notify=notify)
        models = self.upscalers.names() if request.params.is_hires else ()
        problem = over_limits(request.params, self.gen, models)
        if problem:
            ticket.settle(error=GenerationError(problem))
            return ticket.future
        with self._lock:
            if self._stopping:
                ticket.settle(error=JobCancelled("The engine is shutting down; the job was not run."))
            else:
                ticket.arrived, ticket.order = self.clock(), next(self._arrivals)
                self._waiting.append(ticket)
                self._lock.notify_all()
        return ticket.future

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        batch = Batch(self.pipeline.denoiser)
        try:
            with torch.inference_mode():
                self._capture_graphs(self.pipeline)
                while (admitted := self._next_admissions(batch)) is not None:
                    for i, ticket in enumerate(admitted):
                        if not self._admit(batch, ticket):
                            self._put_back(admitted[i:])
                            break
                    self._drop_stopped(batch)
                    if batch.entries:
                        self.batch_rows = batch.rows  # read by the ops metrics
                        self._step(batch)
                    self.batch_rows = batch.rows if batch.entries else 0
        except BaseException:
            log.exception("engine worker thread crashed; failing its jobs")
            raise
        finally:
            self._shut_down(batch)

    def _next_admissions(self, batch: Batch) -> list[Ticket] | None:
        """Waiting tickets that join at this step boundary (blocks while idle; None: stop)."""
        self._resume_parked(batch)
        if not batch.entries:  # the device is idle: what is still on its way to the host lands now
            self.finisher.flush()
        with self._lock:
            while not self._stopping and not self._waiting and not batch.entries:
                self._lock.wait()
            if self._stopping:
                return None
            # An upscale with no diffusion pass joins no batch: one goes at each step boundary.
            upscales = [t for t in self._waiting if t.request.params.upscale_only][:1]
            waiting = [t for t in self._waiting if not t.request.params.upscale_only]
            chosen = admissions(
                [Waiting(t.size, self._key(t.request), t.request.params.count, t.arrived) for t in waiting],
                self._running(batch),
                max_batch=self.settings.max_batch,
                lowered=self.memory.lowered,
                overtake_window=self.settings.overtake_window,
                now=self.clock(),
            )
            taken = upscales + [waiting[i] for i in chosen]
            for ticket in taken:
                self._waiting.remove(ticket)
            self._admitting = list(taken)
            return taken

    def _running(self, batch: Batch) -> Running:
        if not batch.entries:
            return Running(parked=len(self._parked))
        return Running(batch.rows, self._batch_size(batch), self._key(batch.entries[0].job.request), len(self._parked))

    def _resume_parked(self, batch: Batch) -> None:
        """Parked jobs rejoin, oldest first, as the row limit allows (always, into an empty batch)."""
        if not self._parked:
            return
        size = self._parked[0].entry.job.request.params.size
        count = resumptions([p.entry.job.rows for p in self._parked], batch.rows, self.memory.limit(size))
        for parked in self._parked[:count]:
            batch.resume(parked)
        del self._parked[:count]

    def _key(self, request: GenerationRequest) -> Hashable:
        """The batch key, with the job's LoRA set if it runs whole (engine.features.lora.batch_part)."""
        here = self.pipeline is not None and self.models.canonical(request.params.model) == self.model_name
        return (*batch_key(request, self.models.default), batch_part(self.pipeline.loras if here else None, request))

    def loaded_models(self) -> list[str]:
        """Models on the device now (any thread; the queue runner prefers them)."""
        return self.models.loaded()

    def _use_model(self, batch: Batch, request: GenerationRequest) -> Pipeline:
        """Switch to the request's model (only ever into an empty batch: the batch key sees to it)."""
        name = self.models.canonical(request.params.model)
        if name == self.model_name and self.pipeline is not None:
            return self.pipeline
        assert not batch.entries and not self._parked, "a batch never mixes models"
        # Let go of the old model before loading: the pool may drop it to make room.
        self.pipeline = self.model_name = batch.denoiser = None
        self.pipeline = self._compiled(self.models.pipeline(name))
        self.model_name, batch.denoiser = name, self.pipeline.denoiser
        self._capture_graphs(self.pipeline)
        return self.pipeline

    def _compiled(self, pipeline: Pipeline | None) -> Pipeline | None:
        """The pipeline, its UNet compiled as ``engine.compile`` asks (once per loaded model)."""
        if pipeline is not None and self.settings.compile != "off":
            compiler = self._compiler or functools.partial(torch.compile, mode=self.settings.compile, dynamic=False)
            pipeline.denoiser.compile(compiler, self.settings.compile_graphs)
            if pipeline.device.type == "cuda":  # the bucket shapes are fixed: let cuDNN pick per shape
                torch.backends.cudnn.benchmark = True
        return pipeline

    def _capture_graphs(self, pipeline: Pipeline | None) -> None:
        """``engine.compile_capture = "start"``: every graph made now, on this thread (CUDA graphs
        are per thread), instead of by the first job of each shape."""
        if pipeline is not None and pipeline.denoiser.compiled and self.settings.compile_capture == "start":
            capture_graphs(pipeline, self.gen.size_pairs, self.settings.max_batch, self.gen.default_sampler)

    def _batch_size(self, batch: Batch) -> tuple[int, int] | None:
        if not batch.entries:
            return None
        request = batch.entries[0].job.request
        return request.params.width, request.params.height

    def _admit(self, batch: Batch, ticket: Ticket) -> bool:
        """Prepare a job (prompt encoding, noise, init image) and add its rows to the batch.

        False when the device ran out of memory while other jobs hold some: the ticket is to go
        back in line, and joins once the batch has drained a little.
        """
        if ticket.request.params.upscale_only:
            self._upscale_alone(ticket)
            return True
        timeout = self.settings.job_timeout
        ticket.deadline = self.clock() + timeout if timeout else math.inf
        out_of_memory = False
        try:
            pipeline, second = self._use_model(batch, ticket.request), ticket.second_pass
            if second is not None:
                job = prepare_second_pass(pipeline, second, self.upscalers)
            else:
                upscaled = upscaled_init(ticket.request, self.upscalers) if ticket.request.params.upscaler else None
                job = pipeline.prepare(ticket.request, upscaled)
        except torch.OutOfMemoryError:
            job, error, out_of_memory = None, out_of_memory_error(ticket.pass_request), True
        except SlotsBusy:  # it waits for a slot, or for a batch of its own (engine.features.lora, logged)
            return False
        except EngineError as e:
            job, error = None, e
        except Exception as e:
            log.exception("preparing job %s failed", ticket.request.job_id)
            job, error = None, GenerationError(f"Preparing the job failed ({type(e).__name__}: {e}).")
        if out_of_memory:
            free_memory()
            if batch.entries:
                self.memory.preparing_failed(ticket.size, batch.rows)
                return False
        with self._lock:
            self._admitting.remove(ticket)
            if job is not None:
                self._active[id(job)] = ticket
        if job is None:
            ticket.settle(error=error)
            return True
        batch.add(job)  # a cancel that came during preparation takes it out before its first step
        return True

    def _upscale_alone(self, ticket: Ticket) -> None:
        """An upscale-only job: its upscaler runs on this thread, its PNG is made off it."""
        with self._lock:
            self._admitting.remove(ticket)
        name = self.models.canonical(ticket.request.params.model)
        info = self.pipeline.model.info if self.pipeline is not None and self.model_name == name else None
        upscale_alone(ticket, self.upscalers, self.finisher, name, info and info.file_hash)

    def _put_back(self, tickets: list[Ticket]) -> None:
        with self._lock:
            for ticket in tickets:
                self._admitting.remove(ticket)
            self._waiting.extendleft(reversed(tickets))

    def _step(self, batch: Batch) -> None:
        """One denoising step for every row, then progress, NaN isolation and finished jobs."""
        try:
            denoised = batch.step()
        except torch.OutOfMemoryError:
            denoised = None  # handled below, once the exception and the step's tensors are let go
        except Exception as e:
            # The shared UNet call failed: nothing in this batch can go on.
            log.exception("denoising step failed for jobs %s", [e.job.request.job_id for e in batch.entries])
            for entry in list(batch.entries):
                self._retire(batch, entry, error=GenerationError(f"The denoising step failed ({type(e).__name__})."))
            return
        if denoised is None:
            self._out_of_memory(batch)
            return
        self.memory.step_succeeded()
        self._report_progress(batch, denoised)
        if next(self._steps) % NAN_CHECK_EVERY == 0:
            self._nan_checks.append(batch.nonfinite_check())
        self._read_nan_checks(batch)
        finished = [entry for entry in batch.entries if entry.done]
        if finished:
            self._finish(batch, finished)

    def _report_progress(self, batch: Batch, denoised: torch.Tensor) -> None:
        every = self.settings.preview_every
        reports, previewed = [], []
        for entry, rows in batch.offsets():
            ticket = self._active[id(entry.job)]
            if ticket.notify is None or not entry.job.plan.completes[entry.engine_step - 1]:
                continue  # a second-order sampler's first stage is half a step: nothing to report
            total = entry.job.total_steps
            wants_preview = every and entry.step % every == 0 and entry.step < total
            reports.append((ticket, ticket.progress(entry.step, total), wants_preview))
            previewed += [rows.start] if wants_preview else []
        # The previewed rows' latents in one copy to the host that nobody waits for; colours and
        # PNGs are made in the finisher's pool once it has landed.
        latents, index = Readback(rows_of(denoised, previewed)) if previewed else None, itertools.count()
        for ticket, progress, wants_preview in reports:
            preview = Preview(latents, next(index), self.pipeline.family) if wants_preview else None
            self.finisher.progress(ticket, progress, preview)
        self.finisher.poll()

    def _finish(self, batch: Batch, finished: list[Entry]) -> None:
        """Retire finished jobs: one NaN check and one VAE decode for all of them together; their
        images are converted and encoded in the finisher's pool while the next step runs. A hires
        job's first pass goes back in line instead, upscaled in latent space here or decoded first."""
        first_passes = {id(e) for e in finished if self._active[id(e.job)].needs_second_pass}
        in_latents = [e for e in finished if id(e) in first_passes and is_latent(e.job.request.params.hires_upscaler)]
        for entry in in_latents:
            self._to_second_pass(entry, latents=batch.remove(entry.job))
        decoding = [(entry, batch.remove(entry.job)) for entry in finished if entry not in in_latents]
        chunk = self.settings.decode_chunk
        for entry, outcome in decode_finished(self.pipeline, decoding, chunk) if decoding else []:
            if isinstance(outcome, EngineError):
                self._settle(entry, error=outcome)
                continue
            if id(entry) in first_passes:
                self._to_second_pass(entry, images=to_images(*outcome))
                continue
            with self._lock:
                ticket = self._active.pop(id(entry.job))
            self.finisher.result(ticket, self.pipeline, entry.job, outcome)

    def _to_second_pass(self, entry: Entry, *, latents: torch.Tensor | None = None, images: list | None = None) -> None:
        """Put a hires job back in line at its hires size: its overtake window starts again, as for a
        job just arrived, but ahead of every job that arrived after it (it keeps its place)."""
        second = after_first_pass(entry.job, entry.step, self.pipeline.latent_scale, latents=latents, images=images)
        if isinstance(second, EngineError):
            self._settle(entry, error=second)
            return
        with self._lock:  # one step with cancel(): it finds the ticket running or waiting, never neither
            ticket = self._active.pop(id(entry.job))
            if ticket.cancelled:
                self.finisher.fail(ticket, JobCancelled(f"Job {ticket.request.job_id} was cancelled."))
                return
            ticket.second_pass, ticket.arrived = second, self.clock()
            place = next((i for i, t in enumerate(self._waiting) if t.order > ticket.order), len(self._waiting))
            self._waiting.insert(place, ticket)
            self._lock.notify_all()

    def _retire(self, batch: Batch, entry: Entry, *, error: BaseException) -> None:
        batch.remove(entry.job)
        self._settle(entry, error=error)

    def _settle(self, entry: Entry, *, error: BaseException) -> None:
        """Fail a job that leaves the batch (after its pending progress, if any)."""
        with self._lock:
            ticket = self._active.pop(id(entry.job))
        self.finisher.fail(ticket, error)

    def _shut_down(self, batch: Batch) -> None:
        """Whatever is left when the thread ends gets an answer, never silence."""
        for entry in list(batch.entries):
            self._retire(batch, entry, error=JobCancelled("The engine stopped before the job finished."))
        while self._parked:
            self._settle(self._parked.pop().entry, error=JobCancelled("The engine stopped before the job finished."))
        with self._lock:
            self._stopping = True
        self._cancel_waiting()

    def _cancel_waiting(self) -> None:
        with self._lock:
            while self._waiting:
                self._waiting.popleft().settle(error=JobCancelled("The engine stopped before the job started."))
