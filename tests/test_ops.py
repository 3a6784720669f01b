"""The operators' endpoint over real HTTP: a real aiohttp server on 127.0.0.1, port 0.

/metrics is read back with prometheus_client's own parser; /healthz as JSON.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import ops.server
from ops import Health, Metrics, OpsServer, OpsServerError, OpsSettings

pytestmark = pytest.mark.asyncio
TEST_SETTINGS = OpsSettings(enabled=True, host="127.0.0.1", port=0)


class Clock:
    """Monotonic seconds moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def serving(metrics: Metrics | None = None, health: Health | None = None) -> AsyncIterator[Client]:
    async with (
        OpsServer(TEST_SETTINGS, metrics=metrics, health=health) as server,
        aiohttp.ClientSession(base_url=server.url) as session,
    ):
        yield Client(session)


class Client:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics as ``{(name, sorted labels): value}``."""
        async with self.session.get("/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            text = await response.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def health(self) -> tuple[int, dict]:
        async with self.session.get("/healthz") as response:
            assert response.content_type == "application/json"
            return response.status, await response.json()


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# -- /metrics ---------------------------------------------------------------------------------


async def test_jobs_times_images_and_batch_rows_after_calls() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock)
    metrics.job_finished("done", queued_seconds=3.0, generation_seconds=1.5, images=2)
    metrics.job_finished("done", queued_seconds=40.0, generation_seconds=8.0, images=4)
    metrics.job_finished("failed", queued_seconds=0.2, generation_seconds=None)  # failed before it started
    metrics.set_batch_rows(5)
    async with serving(metrics) as client:
        s = await client.metrics()
        assert value(s, "sdbot_jobs_finished_total", status="done") == 2
        assert value(s, "sdbot_jobs_finished_total", status="failed") == 1
        assert value(s, "sdbot_jobs_finished_total", status="cancelled") == 0
        assert value(s, "sdbot_images_generated_total") == 6
        assert value(s, "sdbot_job_queued_seconds_count") == 3
        assert value(s, "sdbot_job_queued_seconds_sum") == pytest.approx(43.2)
        assert value(s, "sdbot_job_queued_seconds_bucket", le="5.0") == 2
        assert value(s, "sdbot_job_generation_seconds_count") == 2
        assert value(s, "sdbot_job_generation_seconds_bucket", le="2.0") == 1
        assert value(s, "sdbot_job_generation_seconds_bucket", le="+Inf") == 2
        assert value(s, "sdbot_batch_rows") == 5
        assert value(s, "sdbot_images_per_second") == pytest.approx(6 / 60)

        clock.now += 61  # the last minute has no images any more; the counter keeps them
        metrics.job_finished("done", queued_seconds=1.0, generation_seconds=1.0, images=3)
        metrics.set_batch_rows(0)
        s = await client.metrics()
        assert value(s, "sdbot_images_per_second") == pytest.approx(3 / 60)
        assert value(s, "sdbot_images_generated_total") == 9
        assert value(s, "sdbot_batch_rows") == 0


async def test_a_job_that_is_not_finished_is_refused() -> None:
    with pytest.raises(ValueError, match="running is not an end state"):
        Metrics().job_finished("running", 1.0, None)


async def test_database_and_discord_flags_follow_their_callables() -> None:
    state = {"database": True, "discord": False}

    def discord_connected() -> bool:
        if state["discord"] is None:
            raise RuntimeError("client gone")
        return state["discord"]

    metrics = Metrics(database_up=lambda: state["database"], discord_connected=discord_connected)
    async with serving(metrics) as client:
        s = await client.metrics()
        assert (value(s, "sdbot_database_up"), value(s, "sdbot_discord_connected")) == (1, 0)
        state.update(database=False, discord=True)
        s = await client.metrics()
        assert (value(s, "sdbot_database_up"), value(s, "sdbot_discord_connected")) == (0, 1)
        state["discord"] = None  # a check that raises reads as down, and the scrape still answers
        assert value(await client.metrics(), "sdbot_discord_connected") == 0


async def test_series_without_a_callable_are_left_out() -> None:
    async with serving(Metrics()) as client:
        names = {name for name, _ in await client.metrics()}
    assert "sdbot_images_per_second" in names
    assert not names & {"sdbot_queue_jobs", "sdbot_database_up", "sdbot_discord_connected"}


async def test_the_compiled_steps_graphs_and_eager_calls_are_reported() -> None:
    """Issue 11 §3: no silent fall-back to eager: the calls past the bound on graphs are counted here."""
    counts: dict[str, tuple[int, int]] | None = None
    metrics = Metrics()
    metrics.read_graphs(lambda: counts)
    series = {
        "sdbot_unet_graphs",
        "sdbot_unet_eager_calls_total",
        "sdbot_sampler_graphs",
        "sdbot_sampler_eager_steps_total",
    }
    async with serving(metrics) as client:
        assert not {name for name, _ in await client.metrics()} & series
        counts = {"unet": (24, 3), "sampler": (24, 5)}  # every graph made, and calls past the bound
        samples = await client.metrics()
    assert value(samples, "sdbot_unet_graphs") == 24 and value(samples, "sdbot_unet_eager_calls_total") == 3
    assert value(samples, "sdbot_sampler_graphs") == 24 and value(samples, "sdbot_sampler_eager_steps_total") == 5


async def test_lora_slot_loads_and_sets_run_alone_are_reported() -> None:
    """Issue 23: a LoRA set that cannot run per row runs in a batch of its own, counted here."""
    metrics = Metrics()
    metrics.read_graphs(lambda: {"lora": (3, 2)})  # an engine that is not compiled reports LoRAs only
    async with serving(metrics) as client:
        samples = await client.metrics()
    assert value(samples, "sdbot_lora_slot_loads_total") == 3 and value(samples, "sdbot_lora_whole_jobs_total") == 2
    assert "sdbot_unet_graphs" not in {name for name, _ in samples}


async def test_queue_depth_is_left_out_while_it_cannot_be_counted() -> None:
    counts: dict | None = {"queued": 4}

    def queue_counts() -> dict:
        if counts is None:
            raise OSError("server closed the connection")
        return counts

    async with serving(Metrics(queue_counts=queue_counts)) as client:
        s = await client.metrics()
        assert value(s, "sdbot_queue_jobs", status="queued") == 4
        assert value(s, "sdbot_queue_jobs", status="running") == 0  # every status, 0 when empty
        counts = None
        s = await client.metrics()
        assert value(s, "sdbot_queue_jobs", status="queued") is None
        assert value(s, "sdbot_jobs_finished_total", status="done") == 0  # the rest still goes out
        counts = {"queued": 1}
        assert value(await client.metrics(), "sdbot_queue_jobs", status="queued") == 1


async def test_openmetrics_when_prometheus_asks_for_it() -> None:
    async with serving(Metrics()) as client:
        headers = {"Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"}
        async with client.session.get("/metrics", headers=headers) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await response.text()).endswith("# EOF\n")


async def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.set_batch_rows(3)
    async with serving(first) as one, serving(second) as two:
        assert value(await one.metrics(), "sdbot_batch_rows") == 3
        assert value(await two.metrics(), "sdbot_batch_rows") == 0
    assert REGISTRY.get_sample_value("sdbot_batch_rows") is None


async def test_gpu_memory_only_once_cuda_is_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for torch with two GPUs, so the CPU-only CI reads the same code path as a GPU.
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: False,
        device_count=lambda: 2,
        memory_allocated=lambda i: 1000 * (i + 1),
        memory_reserved=lambda i: 4096 * (i + 1),
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    async with serving(Metrics()) as client:
        names = {name for name, _ in await client.metrics()}
        assert "sdbot_gpu_memory_allocated_bytes" not in names  # reading now would open a CUDA context
        cuda.is_initialized = lambda: True
        s = await client.metrics()
    assert value(s, "sdbot_gpu_memory_allocated_bytes", device="cuda:0") == 1000
    assert value(s, "sdbot_gpu_memory_allocated_bytes", device="cuda:1") == 2000
    assert value(s, "sdbot_gpu_memory_reserved_bytes", device="cuda:1") == 8192


async def test_gpu_memory_of_a_real_cuda_tensor() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    tensor = torch.ones(1024, 1024, device="cuda")  # 4 MiB
    async with serving(Metrics()) as client:
        s = await client.metrics()
    device = f"cuda:{tensor.device.index or 0}"
    assert value(s, "sdbot_gpu_memory_allocated_bytes", device=device) >= tensor.nbytes
    assert value(s, "sdbot_gpu_memory_reserved_bytes", device=device) >= tensor.nbytes


# -- /healthz ---------------------------------------------------------------------------------


async def test_healthz_fails_naming_the_task_that_ended_and_follows_a_restart() -> None:
    stop = asyncio.Event()
    tasks = {"queue-runner": asyncio.create_task(stop.wait()), "delivery": asyncio.create_task(asyncio.Event().wait())}
    health = Health()
    health.add_task("queue-runner", lambda: tasks["queue-runner"])
    health.add_task("delivery", lambda: tasks["delivery"])
    try:
        async with serving(health=health) as client:
            assert await client.health() == (
                200,
                {"ok": True, "checks": {"queue-runner": True, "delivery": True}, "failed": []},
            )
            stop.set()
            await tasks["queue-runner"]
            status, body = await client.health()
            assert (status, body["ok"], body["failed"]) == (503, False, ["queue-runner"])
            assert body["checks"] == {"queue-runner": False, "delivery": True}

            tasks["queue-runner"] = asyncio.create_task(asyncio.Event().wait())  # a supervisor restarted it
            assert (await client.health())[0] == 200
            tasks["delivery"] = None  # not started
            assert (await client.health())[1]["failed"] == ["delivery"]
    finally:
        for task in tasks.values():
            if task is not None:
                task.cancel()


async def test_healthz_fails_when_a_check_says_no_or_raises() -> None:
    database = {"up": True}

    def discord() -> bool:
        raise RuntimeError("not connected yet")

    health = Health()
    health.add_check("database", lambda: database["up"])
    async with serving(health=health) as client:
        assert (await client.health())[0] == 200
        database["up"] = False
        assert await client.health() == (503, {"ok": False, "checks": {"database": False}, "failed": ["database"]})
        health.add_check("discord", discord)
        database["up"] = True
        assert await client.health() == (
            503,
            {"ok": False, "checks": {"database": True, "discord": False}, "failed": ["discord"]},
        )


async def test_a_check_that_hangs_is_a_503_not_a_hung_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops.server, "ANSWER_TIMEOUT", 0.2)
    release = threading.Event()
    health = Health()
    health.add_check("database", lambda: release.wait(120))  # a database that does not answer
    try:
        async with serving(health=health) as client:
            status, body = await client.health()
            assert (status, body["ok"]) == (503, False)
            assert body["failed"] == ["checks did not answer within 0.2 s"]
    finally:
        release.set()


async def test_health_names_are_unique() -> None:
    health = Health()
    health.add_check("database", lambda: True)
    with pytest.raises(ValueError, match="already added"):
        health.add_check("database", lambda: True)


# -- the server itself ------------------------------------------------------------------------


async def test_a_taken_port_is_one_clear_error_and_stop_closes_the_port() -> None:
    async with OpsServer(TEST_SETTINGS) as first:
        taken = OpsSettings(enabled=True, host="127.0.0.1", port=first.port)
        with pytest.raises(OpsServerError) as caught:
            await OpsServer(taken).start()
        message = str(caught.value)
        assert message.startswith(f"ops: cannot listen on 127.0.0.1:{first.port} (")
        assert "ops.enabled = false" in message and "\n" not in message
        url = first.url
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{url}/metrics")


async def test_unknown_paths_are_404() -> None:
    async with serving() as client:
        async with client.session.get("/") as response:
            assert response.status == 404
