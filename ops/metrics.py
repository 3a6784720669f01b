"""Prometheus metrics of one bot or worker process, in a registry of their own.

Counters and histograms are pushed by the process as jobs end (:meth:`Metrics.job_finished`);
the queue depth, the database, Discord and the GPU are read when Prometheus scrapes, from the
callables the process passes in. Each ``Metrics`` owns its ``CollectorRegistry`` (never
prometheus_client's global one), so several of them, in tests or in one process, never clash.

torch is never imported here: the GPU series appear only where the engine has already imported
torch and put work on CUDA (a ``--no-engine`` bot must stay free of torch).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from db.models import FINISHED, JobStatus

log = logging.getLogger("ops")

#: Seconds over which ``sdbot_images_per_second`` averages.
IMAGES_WINDOW = 60.0
# A job waits from seconds (an idle GPU) to an hour (a busy evening); generation takes about a
# second (a small image on a fast GPU) to minutes (SDXL, many steps, a CPU).
QUEUED_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
GENERATION_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300, 600)


#: What the image check makes of a result (bot/safety/policy.py), each a series from the start.
IMAGE_ACTIONS = ("posted", "exempt", "spoiler", "blur", "withheld")


class Metrics:
    """The series of one process; give it what it reads at scrape time, tell it what happens.

    ``queue_counts() -> {status: jobs}`` (see :func:`ops.queries.queue_counts`),
    ``database_up() -> bool`` and ``discord_connected() -> bool`` are called on a scrape
    thread, never on the event loop, and may block; a series whose callable is None is left
    out (a worker has no Discord). ``clock`` (monotonic seconds) is for tests.
    """

    def __init__(
        self,
        *,
        queue_counts: Callable[[], Mapping[str, int]] | None = None,
        database_up: Callable[[], bool] | None = None,
        discord_connected: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._recent_images: deque[tuple[float, int]] = deque()  # (when, images) of the last minute
        self._recent_lock = threading.Lock()
        self.gpu_memory: Callable[[], dict[str, tuple[int, int]]] = gpu_memory  # see read_gpu_memory
        self.graphs: Callable[[], dict[str, tuple[int, int]] | None] = lambda: None  # see read_graphs
        r = self.registry
        self._finished = Counter("sdbot_jobs_finished", "Jobs that ended here, by outcome", ["status"], registry=r)
        for status in sorted(s.value for s in FINISHED):
            self._finished.labels(status)  # 0 from the start, so rate() has a first point
        self._queued = Histogram(
            "sdbot_job_queued_seconds",
            "Seconds a job waited in line before it started",
            buckets=QUEUED_BUCKETS,
            registry=r,
        )
        self._generation = Histogram(
            "sdbot_job_generation_seconds",
            "Seconds from a job's start to its images",
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self._images = Counter("sdbot_images_generated", "Images generated here (images/s: rate() of this)", registry=r)
        self._batch_rows = Gauge("sdbot_batch_rows", "Images being denoised together in the running batch", registry=r)
        self._image_checks = Counter(
            "sdbot_image_checks",
            "Results the image check saw, by what became of them (posted, exempt, spoiler, blur, withheld)",
            ["action"],
            registry=r,
        )
        for action in IMAGE_ACTIONS:
            self._image_checks.labels(action)
        r.register(_ScrapeTimeSeries(self, queue_counts, database_up, discord_connected))
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends

    # -- what the process tells us ----------------------------------------------------------

    def image_checked(self, action: str) -> None:
        """The image check decided what became of a result (``bot.safety``)."""
        self._image_checks.labels(action).inc()

    def job_finished(
        self, status: JobStatus | str, queued_seconds: float | None, generation_seconds: float | None, images: int = 0
    ) -> None:
        """A job ended (``done``, ``failed`` or ``cancelled``). Times are None where unknown:
        a job failed or cancelled before it started has no generation time."""
        status = JobStatus(status)
        if not status.finished:
            raise ValueError(f"job_finished: {status.value} is not an end state (one of done, failed, cancelled)")
        self._finished.labels(status.value).inc()
        if queued_seconds is not None:
            self._queued.observe(max(0.0, queued_seconds))
        if generation_seconds is not None:
            self._generation.observe(max(0.0, generation_seconds))
        if images > 0:
            self._images.inc(images)
            with self._recent_lock:
                self._recent_images.append((self._clock(), images))
                self._forget_old_images()  # here too: nobody may be scraping

    def set_batch_rows(self, rows: int) -> None:
        """The rows (images) of the running batch now; 0 when the engine is idle."""
        self._batch_rows.set(rows)

    def read_batch_rows(self, rows: Callable[[], int]) -> None:
        """Read the running batch's rows from ``rows()`` at every scrape instead."""
        self._batch_rows.set_function(rows)

    def read_graphs(self, counts: Callable[[], dict[str, tuple[int, int]] | None]) -> None:
        """Read ``{"unet": (graphs made, UNet calls run eager past the bound), "sampler": (graphs
        made, sampler steps run eager)}`` of the compiled step from ``counts()`` at every scrape
        (None: the step is not compiled, the series are left out)."""
        self.graphs = counts

    def read_gpu_memory(self, memory: Callable[[], dict[str, tuple[int, int]]]) -> None:
        """Read GPU memory from ``memory()`` (an engine in another process) instead of this process."""
        self.gpu_memory = memory

    # -- read at scrape time ----------------------------------------------------------------

    def images_per_second(self) -> float:
        """Images generated in the last ``IMAGES_WINDOW`` seconds, per second."""
        with self._recent_lock:
            self._forget_old_images()
            return sum(n for _, n in self._recent_images) / IMAGES_WINDOW

    def _forget_old_images(self) -> None:
        horizon = self._clock() - IMAGES_WINDOW
        while self._recent_images and self._recent_images[0][0] < horizon:
            self._recent_images.popleft()


class _ScrapeTimeSeries:
    """The gauges whose values are read when Prometheus asks (a collector of the registry)."""

    def __init__(
        self,
        metrics: Metrics,
        queue_counts: Callable[[], Mapping[str, int]] | None,
        database_up: Callable[[], bool] | None,
        discord_connected: Callable[[], bool] | None,
    ) -> None:
        self._metrics = metrics
        self._queue_counts = queue_counts
        self._database_up = database_up
        self._discord_connected = discord_connected
        self._queue_failing = False  # logged once when counting starts failing, once when it works again

    def describe(self) -> list[Metric]:
        # Names only, so the registry can refuse a clash without calling the callables.
        names = [
            "sdbot_images_per_second",
            "sdbot_queue_jobs",
            "sdbot_database_up",
            "sdbot_discord_connected",
            "sdbot_gpu_memory_allocated_bytes",
            "sdbot_gpu_memory_reserved_bytes",
            "sdbot_unet_graphs",
            "sdbot_unet_eager_calls",
            "sdbot_sampler_graphs",
            "sdbot_sampler_eager_steps",
        ]
        return [GaugeMetricFamily(name, "") for name in names]

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sdbot_images_per_second",
            f"Images generated here over the last {IMAGES_WINDOW:.0f} s, per second",
            value=self._metrics.images_per_second(),
        )
        if self._queue_counts is not None:
            yield from self._queue_depth()
        if self._database_up is not None:
            yield _flag("sdbot_database_up", "1 when the database answers", self._database_up)
        if self._discord_connected is not None:
            yield _flag(
                "sdbot_discord_connected", "1 when the bot is connected to Discord's gateway", self._discord_connected
            )
        yield from _gpu_memory_metrics(self._metrics.gpu_memory())
        graphs = self._metrics.graphs() or {}
        if "lora" in graphs:  # engine.features.lora: LoRAs into slots, and sets run in a batch of their own
            loads, whole = graphs["lora"]
            yield CounterMetricFamily("sdbot_lora_slot_loads", "LoRAs copied into the LoRA slots", value=loads)
            yield CounterMetricFamily(
                "sdbot_lora_whole_jobs",
                "Jobs whose LoRA set ran in a batch of its own (over engine.lora_max_rank, DoRA, more than the slots)",
                value=whole,
            )
        if "unet" in graphs:
            made, eager = graphs["unet"]
            yield GaugeMetricFamily(
                "sdbot_unet_graphs", "Compiled UNet graphs made (engine.compile_graphs)", value=made
            )
            yield CounterMetricFamily(
                "sdbot_unet_eager_calls", "UNet calls run eager: no graph left for their shape", value=eager
            )
            made, eager = graphs["sampler"]
            yield GaugeMetricFamily(
                "sdbot_sampler_graphs", "Compiled sampler-step graphs made (engine.compile_graphs)", value=made
            )
            yield CounterMetricFamily(
                "sdbot_sampler_eager_steps", "Sampler steps run eager: no graph left for their rows", value=eager
            )

    def _queue_depth(self) -> Iterator[Metric]:
        try:
            counts = dict(self._queue_counts())
        except Exception as e:  # noqa: BLE001 - the database is down: the other series still go out
            if not self._queue_failing:
                log.warning("ops: cannot count the queue's jobs (%s); sdbot_queue_jobs is left out until it can", e)
            self._queue_failing = True
            return
        if self._queue_failing:
            log.info("ops: counting the queue's jobs again")
        self._queue_failing = False
        family = GaugeMetricFamily("sdbot_queue_jobs", "Jobs in the database by status", labels=["status"])
        for status in sorted({s.value for s in JobStatus} | counts.keys()):
            family.add_metric([status], counts.get(status, 0))
        yield family


def _flag(name: str, documentation: str, read: Callable[[], bool]) -> Metric:
    try:
        up = bool(read())
    except Exception:
        log.debug("ops: %s check raised", name, exc_info=True)
        up = False
    return GaugeMetricFamily(name, documentation, value=1.0 if up else 0.0)


def gpu_memory() -> dict[str, tuple[int, int]]:
    """Allocated and reserved CUDA memory of this process per device, from torch's allocator.

    Only once torch is imported and CUDA initialised by the engine: asking earlier would load
    torch into a process without one, or open a CUDA context (hundreds of MB) on every GPU.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        f"cuda:{i}": (torch.cuda.memory_allocated(i), torch.cuda.memory_reserved(i))
        for i in range(torch.cuda.device_count())
    }


def _gpu_memory_metrics(memory: dict[str, tuple[int, int]]) -> Iterator[Metric]:
    if not memory:
        return
    allocated = GaugeMetricFamily("sdbot_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"])
    reserved = GaugeMetricFamily(
        "sdbot_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator", labels=["device"]
    )
    for device, (held, kept) in memory.items():
        allocated.add_metric([device], held)
        reserved.add_metric([device], kept)
    yield allocated
    yield reserved


def record_finished(metrics: Metrics, queue: Any, job_id: int) -> None:
    """Count a job this process finished, with its times (read from its row, in a thread)."""

    def record() -> None:
        job = queue.get(job_id)
        if job is None or not job.status.finished:
            return
        queued = (job.started_at - job.created_at).total_seconds() if job.started_at else None
        generation = (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else None
        images = len(queue.images(job_id)) if job.status is JobStatus.done else 0
        metrics.job_finished(job.status, queued, generation, images)

    asyncio.get_running_loop().run_in_executor(None, record).add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not record a finished job's metrics", exc_info=future.exception())
