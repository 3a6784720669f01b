"""``python -m engine worker``: a process that serves the shared queue with this machine's GPU.

It builds the queue, the model pool, the engine worker and a :class:`~engine.serving.runner.QueueRunner`
over them, serves until SIGINT or SIGTERM, and gives its running jobs back on the way out. The
bot starts one as its child by default (``engine.process = "worker"``) and then passes
``--bot-link``: see :mod:`engine.serving.bot_link` for what travels between the two.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from db.faults import DatabaseHealth, until_reachable
from db.queue import Queue
from db.session import make_engine, upgrade
from db.settings import QueueSettings
from engine.batching.graphs import graph_counts
from engine.config.settings import Settings
from engine.features.describe import describer_for
from engine.serving.bot_link import BotLink
from engine.serving.models import ModelPool, ModelTurns
from engine.serving.runner import QueueRunner, log_failure, worker_identity
from engine.serving.worker import EngineWorker
from ops import Health, Metrics, OpsServer, OpsSettings, database_reachable, queue_counts, record_finished

log = logging.getLogger("engine.serving.runner")  # the name operators know this process's lines by


def run_worker_process(
    settings: Settings,
    queue_settings: QueueSettings,
    *,
    name: str,
    ops_settings: OpsSettings | None = None,
    bot_link: BotLink | None = None,
) -> int:
    """Serve the shared queue from this machine until a signal (or, with ``bot_link``, until
    the bot that started this process is gone).

    Results go to the database; the bot (which may run on a machine without a GPU) posts them.
    Jobs running here when the signal comes are given back to the queue unfinished. A database
    that is not there yet (a server still starting) is waited for; one that cannot be written
    (read-only SQLite file) raises :class:`~db.errors.StorageError`, whose message says what to do.
    """
    db = make_engine(queue_settings.database_url)
    health = DatabaseHealth(log)
    until_reachable(lambda: upgrade(db), health)
    queue = Queue(
        db,
        pending_limit=queue_settings.pending_limit,
        max_attempts=queue_settings.max_attempts,
        lease_seconds=queue_settings.lease_seconds,
    )
    pool = ModelPool.configured(settings.all_models, settings.engine)
    # Loads the default model and the default upscaler.
    worker = EngineWorker(pool, settings.engine, settings.generation, upscalers=settings.upscalers)
    worker_id, prefix = worker_identity(name)
    recovered = until_reachable(lambda: queue.recover_all_running(worker_prefix=prefix), health)
    if recovered:
        log.info("%d job(s) left running by this worker's previous run were put back in line", recovered)
    metrics = Metrics(queue_counts=lambda: queue_counts(db), database_up=lambda: database_reachable(db))
    metrics.read_batch_rows(lambda: worker.batch_rows)
    metrics.read_graphs(lambda: graph_counts(worker.pipeline))
    counted = functools.partial(record_finished, metrics, queue)
    runner = QueueRunner(
        queue,
        worker,
        worker_id=worker_id,
        max_in_flight=settings.engine.max_batch,
        heartbeat_interval=queue_settings.lease_seconds / 4,
        listen=True,
        turns=ModelTurns.for_pool(pool, settings.engine),
        on_progress=bot_link.progress if bot_link is not None else None,
        on_finished=_both(counted, bot_link.finished) if bot_link is not None else counted,
        # The bot that started this process says once that the database is gone, and back.
        database_health=DatabaseHealth(log, quiet=True) if bot_link is not None else None,
        describer=describer_for(settings.describe, settings.engine),
    )
    serving: list[asyncio.Task] = []  # the runner's task, for the health check
    ops = None
    if ops_settings is not None and ops_settings.enabled:
        health = Health()
        health.add_check("database", lambda: database_reachable(db))
        health.add_task("queue-runner", lambda: serving[0] if serving else None)
        ops = OpsServer(ops_settings, metrics=metrics, health=health)

    async def serve() -> None:
        serving.append(asyncio.current_task())
        stats = None
        if bot_link is not None:
            bot_link.listen(asyncio.get_running_loop(), wake=runner.wake, cancel=runner.cancel)
            stats = asyncio.create_task(
                bot_link.send_stats(lambda: worker.batch_rows, lambda: graph_counts(worker.pipeline)),
                name="bot-link-stats",
            )
            stats.add_done_callback(log_failure)
            bot_link.ready(worker.pipeline.model.info.family)
        if ops is not None:
            await ops.start()  # a taken port: OpsServerError, one line
            log.info("health and metrics at %s/healthz and /metrics", ops.url)
        try:
            await runner.run()
        finally:
            if stats is not None:
                stats.cancel()
            if ops is not None:
                await ops.stop()

    worker.start()
    log.info(
        "worker %s serving %s with %s", worker_id, db.url.render_as_string(hide_password=True), ", ".join(pool.names)
    )
    try:
        asyncio.run(_until_signal(serve()))
    finally:
        worker.stop()
        queue.close()
        db.dispose()
        if bot_link is not None:
            bot_link.close()
    return 0


def _both(first: Callable[[int], None], second: Callable[[int], None]) -> Callable[[int], None]:
    def both(job_id: int) -> None:
        first(job_id)
        second(job_id)

    return both


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
