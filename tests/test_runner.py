"""The glue: jobs go from a real queue through the engine on the tiny model and back."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from db.models import JobStatus
from engine.config.settings import EngineSettings, GenerationSettings
from engine.metadata import read_parameters
from engine.serving.runner import QueueRunner
from engine.serving.worker import EngineWorker
from engine_harness import run_until, sqlite_queue  # noqa: F401 - sqlite_queue is a fixture

JOB = dict(prompt="a red fox", steps=3, guidance=5.0, width=64, height=64, sampler="euler", channel_id=1)


@pytest.fixture
def worker(tiny_model):
    worker = EngineWorker(
        tiny_model,
        EngineSettings(max_batch=4, preview_every=1),
        GenerationSettings(max_steps=500, max_width=256, max_height=256),
    )
    worker.start()
    yield worker
    worker.stop()


def test_jobs_of_two_members_are_made_stored_and_announced(sqlite_queue, worker):
    a1 = sqlite_queue.enqueue(requester_id=1, seed=1, **JOB)
    a2 = sqlite_queue.enqueue(requester_id=1, seed=2, count=2, **JOB)
    b1 = sqlite_queue.enqueue(requester_id=2, seed=3, **{**JOB, "sampler": "dpmpp_2m_karras"})
    finished, progress = [], []
    runner = QueueRunner(
        sqlite_queue,
        worker,
        worker_id="w1",
        on_progress=lambda job_id, p: progress.append((job_id, p.step, p.total)),
        on_finished=finished.append,
    )

    asyncio.run(run_until(runner, sqlite_queue, [a1.id, a2.id, b1.id]))

    assert sorted(finished) == sorted([a1.id, a2.id, b1.id])
    for job, count in ((a1, 1), (a2, 2), (b1, 1)):
        assert sqlite_queue.get(job.id).status is JobStatus.done
        images = sqlite_queue.images(job.id)
        assert [image.seed for image in images] == [job.seed + i for i in range(count)]
        png = images[0].png
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        params = read_parameters(png)
        assert params["job_id"] == str(job.id) or params.get("Job id") == str(job.id)
    assert {(job_id, total) for job_id, _, total in progress} >= {(a1.id, 3), (b1.id, 3)}


def test_a_job_the_engine_rejects_fails_with_its_reason(sqlite_queue, worker):
    job = sqlite_queue.enqueue(requester_id=1, seed=1, kind="img2img", init_image=b"not an image", **JOB)
    runner = QueueRunner(sqlite_queue, worker, worker_id="w1")

    asyncio.run(run_until(runner, sqlite_queue, [job.id]))

    stored = sqlite_queue.get(job.id)
    assert stored.status is JobStatus.failed
    assert stored.error and "image" in stored.error.lower()
    assert sqlite_queue.images(job.id) == []


def test_cancel_while_running_stores_no_image(sqlite_queue, worker):
    job = sqlite_queue.enqueue(requester_id=1, seed=1, **{**JOB, "steps": 200})
    runner = QueueRunner(sqlite_queue, worker, worker_id="w1", on_progress=lambda job_id, p: cancel(job_id))

    def cancel(job_id: int) -> None:
        if sqlite_queue.get(job_id).status is JobStatus.running:
            sqlite_queue.cancel(job_id, user_id=1)
            runner.cancel(job_id)

    asyncio.run(run_until(runner, sqlite_queue, [job.id]))

    assert sqlite_queue.get(job.id).status is JobStatus.cancelled
    assert sqlite_queue.images(job.id) == []


def test_stopping_the_runner_gives_running_jobs_back(sqlite_queue, worker):
    job = sqlite_queue.enqueue(requester_id=1, seed=1, **{**JOB, "steps": 500})
    started = []
    runner = QueueRunner(sqlite_queue, worker, worker_id="w1", on_progress=lambda job_id, p: started.append(p))

    async def scenario() -> None:
        task = asyncio.create_task(runner.run())
        async with asyncio.timeout(60):
            while not started:
                await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())

    stored = sqlite_queue.get(job.id)
    assert stored.status is JobStatus.queued
    assert stored.attempts == 0 and stored.worker_id is None
    assert sqlite_queue.images(job.id) == []
