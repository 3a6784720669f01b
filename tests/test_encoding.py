"""Issue 11 §2: after the VAE decode nothing runs on the engine thread. The uint8 conversion,
PNG encoding and preview PNGs run in the finisher's pool, the next step is launched at once, each
job's progress and result still arrive in order, and the PNG compression level is a setting."""

from __future__ import annotations

import asyncio
import threading

import pytest

import engine.pipeline
import engine.serving.finishing
from engine.config.settings import ConfigError, EngineSettings, GenerationSettings, parse_engine_sections
from engine.pipeline import Pipeline
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest, Progress
from tolerance import assert_same_image

BUDGET = 120  # seconds any wait below may take on a slow, shared machine


def make_request(job_id: int, **fields) -> GenerationRequest:
    defaults = dict(
        prompt=f"prompt {job_id}", seed=100 + job_id, steps=4, guidance=5.0, width=64, height=64, sampler="euler_a"
    )
    return GenerationRequest.of(job_id=job_id, **(defaults | fields))


@pytest.fixture
def make_worker(tiny_model):
    workers = []

    def make(**settings) -> EngineWorker:
        worker = EngineWorker(tiny_model, EngineSettings(**({"preview_every": 0} | settings)), GenerationSettings())
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


def run_together(worker: EngineWorker, requests, on_progress=None):
    async def run():
        tasks = [asyncio.ensure_future(worker.generate(r, on_progress)) for r in requests]
        await asyncio.sleep(0)  # all waiting before the thread starts: one batch
        worker.start()
        async with asyncio.timeout(BUDGET):
            return await asyncio.gather(*tasks)

    return asyncio.run(run())


def test_pngs_previews_and_uint8_conversion_run_off_the_engine_thread(make_worker, tiny_model, monkeypatch):
    threads: dict[str, set[str]] = {"png": set(), "preview": set(), "uint8": set()}

    def recorded(kind, real):
        def run(*args, **kwargs):
            threads[kind].add(threading.current_thread().name)
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(engine.pipeline, "encode_png", recorded("png", engine.pipeline.encode_png))
    finishing = engine.serving.finishing
    monkeypatch.setattr(finishing, "preview_png", recorded("preview", finishing.preview_png))
    monkeypatch.setattr(finishing, "to_images", recorded("uint8", finishing.to_images))
    requests = [make_request(1, steps=5), make_request(2, steps=3, count=2, sampler="euler")]
    results = run_together(make_worker(preview_every=2), requests, on_progress=lambda p: None)

    for kind, names in threads.items():
        assert names and all(name.startswith("engine-encode") for name in names), (kind, names)
    # The same images as one job at a time in the calling thread.
    monkeypatch.undo()
    pipeline = Pipeline(tiny_model)
    for request, result in zip(requests, results, strict=False):
        alone = pipeline.generate(request)
        assert [image.seed for image in result.images] == [image.seed for image in alone.images]
        for image, expected in zip(result.images, alone.images, strict=False):
            assert_same_image(image.png, expected.png)


def test_the_next_step_runs_while_a_finished_jobs_png_is_being_written(make_worker, monkeypatch):
    """Job 1 finishes first; its PNG encoding is held until job 2 has taken every step."""
    real_encode, job_2_done = engine.pipeline.encode_png, threading.Event()
    held = []

    def held_for_job_1(image, text, job_id, *args):
        if job_id == 1:
            held.append(threading.current_thread().name)
            assert job_2_done.wait(BUDGET), "the engine thread did not step job 2 while job 1's PNG was held"
        return real_encode(image, text, job_id, *args)

    def progress(p: Progress) -> None:
        if p.job_id == 2 and p.step == p.total:
            job_2_done.set()

    monkeypatch.setattr(engine.pipeline, "encode_png", held_for_job_1)
    first, second = run_together(make_worker(), [make_request(1, steps=2), make_request(2, steps=6)], progress)
    assert held and first.images and second.images


def test_each_jobs_progress_previews_and_result_arrive_in_order(make_worker, monkeypatch):
    """The first preview's PNG is held until the engine thread has reported later steps: they
    reach the job after it all the same, every progress before the result."""
    real_preview, later_steps = engine.serving.finishing.preview_png, threading.Event()

    def held_first_preview(latents, family):
        if not later_steps.is_set():
            assert later_steps.wait(BUDGET), "the engine thread waited for a preview PNG"
        return real_preview(latents, family)

    worker = make_worker(preview_every=2)
    real_progress = worker.finisher.progress

    def progress_made(ticket, progress, preview):  # on the engine thread
        real_progress(ticket, progress, preview)
        if progress.step == 3:
            later_steps.set()

    monkeypatch.setattr(engine.serving.finishing, "preview_png", held_first_preview)
    monkeypatch.setattr(worker.finisher, "progress", progress_made)
    seen: list[tuple[int, int, bool]] = []
    order: list[tuple[int, int]] = []

    async def run():
        async def one(request):
            result = await worker.generate(request, lambda p: seen.append((p.job_id, p.step, p.preview is not None)))
            order.append((request.job_id, len([s for s in seen if s[0] == request.job_id])))
            return result

        tasks = [asyncio.ensure_future(one(r)) for r in (make_request(1, steps=5), make_request(2, steps=4))]
        await asyncio.sleep(0)
        worker.start()
        async with asyncio.timeout(BUDGET):
            return await asyncio.gather(*tasks)

    asyncio.run(run())
    for job_id, steps in ((1, 5), (2, 4)):
        mine = [(step, preview) for j, step, preview in seen if j == job_id]
        assert mine == [(step, step % 2 == 0 and step < steps) for step in range(1, steps + 1)]
    assert sorted(order) == [(1, 5), (2, 4)]  # each result came after all of its job's progress


def test_a_cancel_while_a_preview_is_encoded_still_ends_the_job(make_worker, monkeypatch):
    """The first preview's encoding cancels the job (from the pool); the engine thread waits for
    that at step 2, so the cancel lands mid-run however slow the machine."""
    from engine.errors import JobCancelled

    real_preview, cancelled = engine.serving.finishing.preview_png, threading.Event()
    worker = make_worker(preview_every=1)
    real_progress = worker.finisher.progress

    def cancelling_preview(latents, family):
        worker.cancel(1)
        cancelled.set()
        return real_preview(latents, family)

    def progress_made(ticket, progress, preview):  # on the engine thread
        if progress.step == 2:
            assert cancelled.wait(BUDGET)
        real_progress(ticket, progress, preview)

    monkeypatch.setattr(engine.serving.finishing, "preview_png", cancelling_preview)
    monkeypatch.setattr(worker.finisher, "progress", progress_made)
    worker.start()
    steps: list[int] = []
    with pytest.raises(JobCancelled):
        worker.generate_blocking(make_request(1, steps=40), on_progress=lambda p: steps.append(p.step))
    assert steps in ([1], [1, 2])  # stopped at the first step boundary after the cancel, in order
    monkeypatch.undo()
    assert worker.generate_blocking(make_request(2, steps=2)).images  # the worker goes on


def test_the_png_compression_level_is_a_setting_that_changes_size_not_pixels(make_worker):
    request = make_request(1, steps=2)
    fast, small = make_worker(png_compress_level=0), make_worker(png_compress_level=9)
    (stored,), (compressed,) = run_together(fast, [request]), run_together(small, [request])
    assert len(stored.images[0].png) > len(compressed.images[0].png)
    assert_same_image(stored.images[0].png, compressed.images[0].png)
    assert EngineSettings().png_compress_level == 1


@pytest.mark.parametrize("value", [-1, 10])
def test_a_compression_level_outside_0_to_9_is_refused(value):
    with pytest.raises(ConfigError, match=r"engine.png_compress_level = .*0 \(fastest, largest files\) to 9"):
        parse_engine_sections({"engine": {"png_compress_level": value}})
    assert parse_engine_sections({"engine": {"png_compress_level": 6}}).engine.png_compress_level == 6
