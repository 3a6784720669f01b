"""The glue between the job queue and the engine: the one place where a job moves from the
database into the engine and its images move back.

``QueueRunner`` claims jobs in the queue's fair order while the engine worker has room, turns
each row into a ``GenerationRequest``, keeps the job's lease alive with heartbeats while it
runs, and stores the result (or the reason it failed). It never talks to Discord: whoever
posts results (the bot, in this or another process) finds them in the database, and is woken
in-process through ``on_finished``. This is also what a standalone GPU worker process runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from db.models import Job
from db.queue import Queue
from db.session import make_engine, upgrade
from db.settings import QueueSettings
from engine.errors import GenerationError, JobCancelled
from engine.models import ModelPool, ModelTurns
from engine.settings import Settings
from engine.params import params_from_job
from engine.types import GenerationRequest, Progress
from engine.worker import EngineWorker

log = logging.getLogger(__name__)


def worker_identity(name: str) -> tuple[str, str]:
    """``(worker_id, prefix)`` for a worker called ``name`` on this machine.

    The id changes with every process (``host/name#pid``), the prefix does not: at start-up a
    worker puts back in line the jobs that its own previous incarnation left running, at once,
    without touching jobs of other live workers (whose names differ).
    """
    prefix = f"{socket.gethostname()}/{name}#"
    return f"{prefix}{os.getpid()}", prefix


def request_from_job(job: Job) -> GenerationRequest:
    """The engine's view of a stored job."""
    return GenerationRequest(job.id, params_from_job(job))


class QueueRunner:
    """Feeds the engine worker from the queue and stores what comes back."""

    def __init__(
        self,
        queue: Queue,
        worker: EngineWorker,
        *,
        worker_id: str,
        max_in_flight: int = 8,
        poll_interval: float = 1.0,
        heartbeat_interval: float = 20.0,
        listen: bool = False,
        on_progress: Callable[[int, Progress], None] | None = None,
        on_finished: Callable[[int], None] | None = None,
        turns: ModelTurns | None = None,
    ) -> None:
        """``turns``: claim only jobs for the worker's models, one model at a time (see
        :class:`~engine.models.ModelTurns`); None: claim every job (one model, one worker)."""
        self.queue = queue
        self.worker = worker
        self.worker_id = worker_id
        self.max_in_flight = max_in_flight
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.listen = listen
        self.on_progress = on_progress
        self.on_finished = on_finished
        self.turns = turns
        self._tasks: dict[int, asyncio.Task] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A job was enqueued or finished: look at the queue now rather than at the next poll."""
        self._wake.set()

    def cancel(self, job_id: int) -> None:
        """Stop a running job at its next step (the queue has already marked it cancelled)."""
        self.worker.cancel(job_id)

    @property
    def running(self) -> set[int]:
        return set(self._tasks)

    async def run(self) -> None:
        """Claim and run jobs until cancelled; on the way out, running jobs go back in line.

        With ``listen``, a helper thread waits on the queue's wake-up (PostgreSQL LISTEN/NOTIFY),
        so jobs enqueued by another process start at once; polling remains the fallback.
        """
        listener = None
        if self.listen:
            listener = asyncio.create_task(self._listen(), name="queue-listener")
            listener.add_done_callback(_log_failure)
        try:
            while True:
                await self._claim_while_room()
                self._wake.clear()
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel.
                    async with asyncio.timeout(self.poll_interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            if listener is not None:
                listener.cancel()
            await self._shutdown()

    async def _listen(self) -> None:
        while True:
            if await asyncio.to_thread(self.queue.wait_for_jobs, max(self.poll_interval, 5.0)):
                self._wake.set()

    async def _claim_while_room(self) -> None:
        while len(self._tasks) < self.max_in_flight:
            job = await asyncio.to_thread(self._claim_next)
            if job is None:
                return
            task = asyncio.create_task(self._run_job(job), name=f"job-{job.id}")
            self._tasks[job.id] = task
            task.add_done_callback(self._job_done)

    def _claim_next(self) -> Job | None:
        """The next job in fair order, for the model whose turn it is (runs in a thread)."""
        if self.turns is None:
            return self.queue.claim(self.worker_id)
        # claim() recovers expired leases itself, but with turns we only claim when a model has
        # waiting jobs: recover first, or a dead worker's jobs would never count as waiting.
        self.queue.recover()
        model = self.turns.choose(self.queue.waiting_models(), self.worker.loaded_models(), time.monotonic())
        if model is None:
            return None
        return self.queue.claim(self.worker_id, model=model, unassigned=model == self.turns.default)

    def _job_done(self, task: asyncio.Task) -> None:
        job_id = int(task.get_name().removeprefix("job-"))
        self._tasks.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s: runner task failed", job_id, exc_info=task.exception())
        self._wake.set()

    async def _run_job(self, job: Job) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job.id), name=f"heartbeat-{job.id}")
        heartbeat.add_done_callback(_log_failure)
        try:
            stored = await self._generate_and_store(job)
        finally:
            heartbeat.cancel()
        if stored and self.on_finished is not None:
            self.on_finished(job.id)

    async def _generate_and_store(self, job: Job) -> bool:
        """Run one job; True when its outcome (images or failure) was written by us."""
        request = request_from_job(job)
        progress = None
        if self.on_progress is not None:
            callback = self.on_progress

            def progress(p: Progress) -> None:
                callback(job.id, p)

        try:
            result = await self.worker.generate(request, on_progress=progress)
        except JobCancelled:
            # Cancelled by its member (the queue says so already) or our lease was taken over.
            return True
        except GenerationError as e:
            return await asyncio.to_thread(self.queue.fail, job.id, self.worker_id, str(e))
        except Exception as e:  # a bug must fail this job, never the runner
            log.exception("job %s: unexpected engine error", job.id)
            return await asyncio.to_thread(
                self.queue.fail, job.id, self.worker_id, f"internal error in the engine ({type(e).__name__})"
            )
        images = [(image.png, image.seed) for image in result.images]
        return await asyncio.to_thread(self.queue.complete, job.id, self.worker_id, images)

    async def _heartbeat(self, job_id: int) -> None:
        """Renew the lease; when it is lost (cancelled, or taken over) stop the job."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not await asyncio.to_thread(self.queue.heartbeat, job_id, self.worker_id):
                self.worker.cancel(job_id)
                return

    async def _shutdown(self) -> None:
        """Stop running jobs and give them back to the queue, so nothing is lost on exit."""
        job_ids, tasks = list(self._tasks), list(self._tasks.values())
        for job_id in job_ids:
            self.worker.cancel(job_id)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job_id in job_ids:
            await asyncio.to_thread(self.queue.release, job_id, self.worker_id)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


def run_worker_process(settings: Settings, queue_settings: QueueSettings, *, name: str) -> int:
    """``python -m engine worker``: serve the shared queue from this machine until a signal.

    Results go to the database; the bot (which may run on a machine without a GPU) posts them.
    Jobs running here when the signal comes are given back to the queue unfinished.
    """
    db = make_engine(queue_settings.database_url)
    upgrade(db)
    queue = Queue(db, pending_limit=queue_settings.pending_limit, max_attempts=queue_settings.max_attempts,
                  lease_seconds=queue_settings.lease_seconds)
    pool = ModelPool.configured(settings.all_models, settings.engine)
    worker = EngineWorker(pool, settings.engine, settings.generation)  # loads the default model
    worker_id, prefix = worker_identity(name)
    recovered = queue.recover_all_running(worker_prefix=prefix)
    if recovered:
        log.info("%d job(s) left running by this worker's previous run were put back in line", recovered)
    runner = QueueRunner(queue, worker, worker_id=worker_id, max_in_flight=settings.engine.max_batch,
                         heartbeat_interval=queue_settings.lease_seconds / 4, listen=True,
                         turns=ModelTurns.for_pool(pool, settings.engine))
    worker.start()
    log.info("worker %s serving %s with %s", worker_id, db.url.render_as_string(hide_password=True),
             ", ".join(pool.names))
    try:
        asyncio.run(_until_signal(runner.run()))
    finally:
        worker.stop()
        queue.close()
        db.dispose()
    return 0


async def _until_signal(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` until SIGINT or SIGTERM, then cancel it (its clean-up still runs)."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped by signal; running jobs were put back in line")
