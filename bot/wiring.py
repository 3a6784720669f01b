"""The one place the bot's application is put together, for ``python -m bot`` and for the tests.

config → database → queue → community → client → delivery (given the client's few Discord calls,
the state store) → engine (a worker in this process, a child process, or none) → runner (telling
delivery of progress and finished jobs) → job service → handed to the client for its cogs.
The tests call :func:`build_bot` with their own tiny-model worker; ``python -m bot`` calls
:func:`open_database`, then :func:`load_engine` or starts an
:class:`~bot.engine_process.EngineProcess`, and then the same :func:`build_bot`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Engine

from bot.acks import PendingAcks
from bot.client import SDBot, utcnow
from bot.config import Config
from bot.delivery import Delivery
from bot.engine_process import EngineProcess
from bot.inputs import DISCORD_CDN_HOSTS
from bot.safety.classifier import Classifies, ImageClassifier, SafetyCheck
from bot.safety.moderation import Moderation
from bot.safety.results import ResultChecks
from bot.service import JobService
from db.community import Community
from db.faults import DatabaseHealth, until_reachable
from db.queue import Queue
from db.safety import SafetyRecords
from db.session import make_engine, upgrade
from db.state import StateStore
from db.styles import Styles
from ops import Health, Metrics, OpsServer, database_reachable, queue_counts, record_finished

log = logging.getLogger(__name__)


@dataclass
class BotApp:
    """Everything a running bot is made of (the tests reach into it)."""

    config: Config
    queue: Queue
    community: Community
    runner: Any | None
    bot: SDBot
    ops: OpsServer  # started by ``run`` when ``[ops] enabled``


def open_queue(db: Engine, config: Config) -> Queue:
    return Queue(
        db,
        pending_limit=config.queue.pending_limit,
        max_attempts=config.queue.max_attempts,
        lease_seconds=config.queue.lease_seconds,
    )


def open_database(config: Config) -> tuple[Engine, Queue]:
    """Create or upgrade the database (slow: call it in a thread) and open the queue."""
    db = make_engine(config.queue.database_url)
    until_reachable(lambda: upgrade(db), DatabaseHealth())  # a database still starting is waited for
    return db, open_queue(db, config)


def load_engine(config: Config) -> tuple[Any, str]:
    """Load the default model and make the engine worker (slow: call it in a thread); returns
    the worker and the loaded model's family (``"sdxl"`` picks SDXL's sizes for the commands).
    Raises ModelLoadError, or ConfigError for a device this machine lacks."""
    from engine.serving.models import ModelPool
    from engine.serving.worker import EngineWorker

    worker = EngineWorker(
        ModelPool.configured((config.model, *config.models), config.engine),
        config.engine,
        config.generation,
        upscalers=config.upscalers,
    )
    return worker, worker.pipeline.model.info.family  # loads the default model now: a bad one stops the start


def load_safety(config: Config) -> SafetyCheck:
    """Load ``[safety] classifier`` (slow: call it in a thread); raises ClassifierError, one line."""
    settings = config.safety
    classifier: Classifies
    if settings.classifier == "nudenet":  # the optional extra (AGPL-3.0: README, "Image safety")
        from bot.safety.nudenet import NudeNetClassifier

        classifier = NudeNetClassifier.load(batch_size=settings.batch_size)
    else:
        classifier = ImageClassifier.load(settings.classifier, batch_size=settings.batch_size, device=settings.device)
    log.info("image check: %s (labels %s)", settings.classifier, ", ".join(classifier.labels))
    return SafetyCheck(classifier)


def with_families(config: Config, default_family: str | None = None) -> Config:
    """``config`` with each model's generation settings for its family (SDXL's sizes; SD 3.5's and
    Flux's sizes, steps, guidance and samplers): the default model's family as the engine loaded
    it (``default_family``), the others' as configured or read from their files
    (:func:`engine.families.detect.source_family`; a hub id's is taken to be the default's)."""
    from engine.families import guidance_kind
    from engine.families.detect import source_family

    found = source_family(config.model.source, config.model.family)
    if default_family and (found is None or found[0] != default_family):
        found = (default_family, guidance_kind(default_family))
    default = found or ("sd1", "cfg")  # a hub id with no engine here: as the SD families
    by_model = []
    for model in (config.model, *config.models):
        family, guidance = default if model is config.model else source_family(model.source, model.family) or default
        by_model.append((model.display_name, config.generation.for_family(family, guidance, model)))
    return replace(config, generation=by_model[0][1], by_model=tuple(by_model))


def build_bot(
    config: Config,
    queue: Queue,
    worker: Any | None = None,
    *,
    worker_name: str = "bot",
    engine_process: EngineProcess | None = None,
    model_family: str | None = None,
    safety_check: SafetyCheck | None = None,
    poll_interval: float = 1.0,
    **client_options: Any,
) -> BotApp:
    """The bot over ``queue``, with a queue runner feeding ``worker``, or with its engine in the
    child process ``engine_process`` (both None: GPU workers run in other processes). The worker
    (or the child) is started by the caller; the in-process worker's jobs left running by its
    previous run are put back in line here (the child recovers its own). ``safety_check``: the
    loaded image classifier (None: loaded here when ``[safety] classifier`` is set)."""
    clock = client_options.get("clock", utcnow)
    community = Community(queue.engine, clock=clock)
    styles = Styles(queue.engine, clock=clock)
    state = StateStore(queue.engine)
    config = with_families(config, model_family)
    metrics = Metrics(
        queue_counts=lambda: queue_counts(queue.engine),
        database_up=lambda: database_reachable(queue.engine),
        discord_connected=lambda: bot.connected,
    )  # read at scrape time, once the bot exists
    database = DatabaseHealth(logging.getLogger("bot"))  # one for the process: each change said once
    allowed_hosts = client_options.pop("allowed_hosts", DISCORD_CDN_HOSTS)
    bot = SDBot(config, queue, state, **client_options)
    if safety_check is None and config.safety.enabled:
        safety_check = load_safety(config)
    records = SafetyRecords(queue.engine, clock=clock)
    checks = ResultChecks(safety_check, config.safety, queue, community, records, on_action=metrics.image_checked)
    delivery = Delivery(
        bot,
        queue,
        interval=config.discord.progress_interval,
        model_name=config.model.display_name,
        clock=clock,
        community=community,
        state=state,
        database=database,
        checks=checks,
        edit_words=bool(config.discord.edit_model),
    )

    def finished(job_id: int) -> None:
        delivery.on_finished(job_id)
        record_finished(metrics, queue, job_id)

    runner = None
    if worker is not None:
        from engine.features.describe import describer_for
        from engine.serving.models import ModelTurns
        from engine.serving.runner import QueueRunner, worker_identity

        worker_id, prefix = worker_identity(worker_name)
        recovered = queue.recover_all_running(worker_prefix=prefix)
        if recovered:
            log.info("%d job(s) left running by a previous run were recovered", recovered)
        runner = QueueRunner(
            queue,
            worker,
            worker_id=worker_id,
            max_in_flight=config.engine.max_batch,
            poll_interval=poll_interval,
            heartbeat_interval=config.queue.lease_seconds / 4,
            listen=config.queue.database_url.startswith("postgresql"),
            turns=ModelTurns.for_pool(worker.models, config.engine),
            on_progress=delivery.on_progress,
            on_finished=finished,
            database_health=database,
            describer=describer_for(config.describe, config.engine),
        )
    elif engine_process is not None:
        runner = engine_process  # stands where the runner would: run(), wake(), cancel()
        engine_process.on_progress, engine_process.on_finished = delivery.on_progress, finished
        metrics.read_batch_rows(lambda: engine_process.batch_rows)
        metrics.read_gpu_memory(lambda: engine_process.gpu_memory)
        metrics.read_graphs(lambda: engine_process.graphs)
    service = JobService(
        config,
        queue,
        community,
        styles,
        runner,
        delivery,
        PendingAcks(state, queue.engine),
        clock=clock,
        allowed_hosts=allowed_hosts,
        checks=checks,
    )
    moderation = Moderation(bot, queue, community, records, checks, delivery.poster)
    bot.attach(service, delivery, runner, moderation)
    if worker is not None:
        from engine.batching.graphs import graph_counts

        metrics.read_batch_rows(lambda: worker.batch_rows)
        metrics.read_graphs(lambda: graph_counts(worker.pipeline))
    health = Health()
    health.add_check("database", lambda: database_reachable(queue.engine))
    health.add_task("delivery", lambda: bot.task("delivery"))
    if runner is not None:
        health.add_task("queue-runner", lambda: bot.task("queue-runner"))
    ops = OpsServer(config.ops, metrics=metrics, health=health)
    return BotApp(config=config, queue=queue, community=community, runner=runner, bot=bot, ops=ops)
