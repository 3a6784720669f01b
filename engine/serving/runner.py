"""The glue between the job queue and the engine: the one place where a job moves from the
database into the engine and its images move back.

``QueueRunner`` claims jobs in the queue's fair order while the engine worker has room, turns
each row into a ``GenerationRequest``, keeps the job's lease alive with heartbeats while it
runs, and stores the result (or the reason it failed). It never talks to Discord: whoever
posts results (the bot, in this or another process) finds them in the database, and is woken
in-process through ``on_finished``. This is also what a standalone GPU worker process runs.

A database outage of any length, or a SQLite write lock held past the busy timeout, is waited out
(:mod:`db.faults`): every queue call is retried with backoff until the database answers, so the
main loop, the listener and the heartbeats go on, a result finished meanwhile is stored once it is
back (the queue's complete/fail are safe to repeat), and running jobs keep their leases (the
runner's own claims never take them from it). :attr:`QueueRunner.database_reachable` and
:attr:`QueueRunner.stats` are the health view for operators.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from db.faults import Backoff, DatabaseHealth, is_database_fault
from db.models import Job, JobKind
from db.queue import Queue, woken_within
from engine.errors import GenerationError, JobCancelled
from engine.features.describe import Describer
from engine.params import params_from_job
from engine.serving.models import ModelTurns
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest, Progress

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunnerStats:
    """What a runner has finished since it started (for /metrics)."""

    jobs_done: int = 0
    jobs_failed: int = 0
    images_done: int = 0


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
    return GenerationRequest(job.id, params_from_job(job), parent_id=job.parent_id)


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
        database_health: DatabaseHealth | None = None,
        describer: Describer | None = None,
    ) -> None:
        """``turns``: claim only jobs for the worker's models, one model at a time (see
        :class:`~engine.serving.models.ModelTurns`); None: claim every job (one model, one worker).
        ``describer``: /describe's captioner (engine.features.describe), which runs its jobs in a
        thread beside the engine's; None: a /describe job fails, saying it is not configured."""
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
        self.describer = describer
        self._tasks: dict[int, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._health = database_health or DatabaseHealth(log)  # shared with the bot's other tasks in its process
        self._marking: set[asyncio.Task] = set()  # mark_started writes in flight (held: tasks are weak)
        self.stats = RunnerStats()

    @property
    def database_reachable(self) -> bool:
        """False from a failed queue call until the next one that succeeds."""
        return self._health.reachable

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
            listener.add_done_callback(log_failure)
        backoff = Backoff()
        try:
            while True:
                try:
                    await self._claim_while_room()
                    backoff.reset()
                except Exception:  # a bug must not stop the queue: say so, wait, go on
                    log.exception("queue runner: claiming failed; trying again")
                    await asyncio.sleep(backoff.next())
                await woken_within(self._wake, self.poll_interval)
        finally:
            if listener is not None:
                listener.cancel()
            await self._shutdown()

    async def _listen(self) -> None:
        backoff = Backoff()
        while True:
            try:
                if await asyncio.to_thread(self.queue.wait_for_jobs, max(self.poll_interval, 5.0)):
                    self._wake.set()
                backoff.reset()
            except Exception:  # polling goes on meanwhile; the listener must not die
                log.exception("queue listener failed; listening again")
                await asyncio.sleep(backoff.next())

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a thread, retried with backoff for as long as the database is away."""
        backoff = Backoff()
        while True:
            try:
                result = await asyncio.to_thread(call, *args)
            except Exception as error:
                if not is_database_fault(error):
                    raise
                self._health.failed(error)
                await asyncio.sleep(backoff.next())
                continue
            self._health.succeeded()
            return result

    async def _claim_while_room(self) -> None:
        while len(self._tasks) < self.max_in_flight:
            job = await self._db(self._claim_next, frozenset(self._tasks))
            if job is None:
                return
            task = asyncio.create_task(self._run_job(job), name=f"job-{job.id}")
            self._tasks[job.id] = task
            task.add_done_callback(self._job_done)

    def _claim_next(self, running: frozenset[int]) -> Job | None:
        """The next job in fair order, for the model whose turn it is (runs in a thread).

        ``running``: our jobs in the engine, whose leases are ours even if an outage let them run out.
        """
        if self.turns is None:
            return self.queue.claim(self.worker_id, keep=running)
        # claim() recovers expired leases itself, but with turns we only claim when a model has
        # waiting jobs: recover first, or a dead worker's jobs would never count as waiting.
        self.queue.recover(keep=running)
        model = self.turns.choose(self.queue.waiting_models(), self.worker.loaded_models(), time.monotonic())
        if model is None:
            return None
        return self.queue.claim(self.worker_id, model=model, unassigned=model == self.turns.default, keep=running)

    def _job_done(self, task: asyncio.Task) -> None:
        job_id = int(task.get_name().removeprefix("job-"))
        self._tasks.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s: runner task failed", job_id, exc_info=task.exception())
        self._wake.set()

    async def _run_job(self, job: Job) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job.id), name=f"heartbeat-{job.id}")
        heartbeat.add_done_callback(log_failure)
        try:
            stored = await self._generate_and_store(job)
        finally:
            heartbeat.cancel()
        if stored and self.on_finished is not None:
            self.on_finished(job.id)

    async def _generate_and_store(self, job: Job) -> bool:
        """Run one job; True when its outcome (images or failure) was written by us."""
        request = request_from_job(job)
        started = False

        def progress(p: Progress) -> None:  # on the event loop's thread
            nonlocal started
            if not started:  # the engine has begun it: now the attempt counts (one write, off the loop)
                started = True
                task = asyncio.create_task(
                    self._db(self.queue.mark_started, job.id, self.worker_id), name=f"started-{job.id}"
                )
                self._marking.add(task)
                task.add_done_callback(self._marking.discard)
                task.add_done_callback(log_failure)
            if self.on_progress is not None:
                self.on_progress(job.id, p)

        try:
            result = await self._engine_for(job).generate(request, on_progress=progress)
        except JobCancelled:
            # Cancelled by its member (the queue says so already) or our lease was taken over.
            return True
        except GenerationError as e:
            return await self._fail(job.id, str(e))
        except Exception as e:  # a bug must fail this job, never the runner
            log.exception("job %s: unexpected engine error", job.id)
            return await self._fail(job.id, f"internal error in the engine ({type(e).__name__})")
        images = [(image.png, image.seed) for image in result.images]
        stored = await self._db(self.queue.complete, job.id, self.worker_id, images)
        if stored:
            self.stats.jobs_done += 1
            self.stats.images_done += len(images)
        return stored

    def _engine_for(self, job: Job) -> EngineWorker | Describer:
        """Who makes ``job``: the engine worker, or /describe's captioner."""
        if job.kind is not JobKind.describe:
            return self.worker
        if self.describer is None:
            raise GenerationError("/describe is not set up on this worker ([describe] captioner in config.toml).")
        return self.describer

    async def _fail(self, job_id: int, error: str) -> bool:
        stored = await self._db(self.queue.fail, job_id, self.worker_id, error)
        if stored:
            self.stats.jobs_failed += 1
        return stored

    async def _heartbeat(self, job_id: int) -> None:
        """Renew the lease; when it is lost (cancelled, or taken over) stop the job. While the
        database is away the renewal waits for it: the lease is renewed the moment it is back."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                ours = await self._db(self.queue.heartbeat, job_id, self.worker_id)
            except Exception:  # a bug in one renewal must not leave the lease to run out
                log.exception("job %s: heartbeat failed; trying again at the next one", job_id)
                continue
            if not ours:
                self.worker.cancel(job_id)
                return

    async def _shutdown(self) -> None:
        """Stop running jobs and give them back to the queue, so nothing is lost on exit."""
        job_ids, tasks = list(self._tasks), list(self._tasks.values())
        for job_id in job_ids:
            self.worker.cancel(job_id)
        # A start still being recorded either lands before the release (which un-counts it) or
        # after it (and matches nothing: the job is no longer ours).
        marking = list(self._marking)
        for task in tasks + marking:
            task.cancel()
        await asyncio.gather(*tasks, *marking, return_exceptions=True)
        for job_id in job_ids:
            try:
                await asyncio.to_thread(self.queue.release, job_id, self.worker_id)
            except Exception as error:  # noqa: BLE001 - no waiting on the way out: the lease hands it back
                log.warning(
                    "job %s: could not give it back (%s); it goes back in line when its lease runs out", job_id, error
                )


def log_failure(task: asyncio.Task) -> None:
    """Done-callback for background tasks: a task that died says so, with its traceback."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())
