"""Engine faults (issue 5): out of GPU memory, NaN/black images from a low-precision VAE, time limits.

The faults are injected on the CPU by fakes with real behaviour: a denoiser that runs out of
memory above a number of rows, a VAE that overflows when it does not run in float32, a clock
that moves only when the test moves it. Every job is checked by its pixels or its stored reason.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from db.models import JobStatus
from engine.batching.batch import Batch
from engine.config.settings import EngineSettings, GenerationSettings
from engine.errors import GenerationError
from engine.families.loading import load_model
from engine.pipeline import Pipeline
from engine.serving.runner import QueueRunner
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest, Progress
from engine_harness import sqlite_queue  # noqa: F401 - sqlite_queue is a fixture
from tolerance import assert_same_image, assert_same_latents


def make_request(job_id: int, **fields) -> GenerationRequest:
    defaults = dict(
        prompt=f"prompt {job_id}", seed=100 + job_id, steps=4, guidance=5.0, width=64, height=64, sampler="euler_a"
    )
    return GenerationRequest.of(job_id=job_id, **(defaults | fields))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


class OutOfMemoryAbove:
    """A denoiser on a device that holds at most ``rows`` rows: above that it runs out of memory."""

    def __init__(self, denoiser, rows: int) -> None:
        self.denoiser, self.rows = denoiser, rows
        self.refused: list[int] = []  # row counts that did not fit

    def __getattr__(self, name):  # the rest (the batch's timestep tables) is the real denoiser's
        return getattr(self.denoiser, name)

    def __call__(self, x, sigma, cond, **inputs):
        if x.shape[0] > self.rows:
            self.refused.append(x.shape[0])
            raise torch.OutOfMemoryError(f"CUDA out of memory: {x.shape[0]} rows, room for {self.rows}")
        return self.denoiser(x, sigma, cond, **inputs)


class ManualClock:
    """A monotonic clock that moves only when told to (``tick`` > 0: by that much at every read)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture
def make_worker(tiny_model):
    workers = []

    def make(max_batch: int = 8, fits_rows: int | None = None, model=None, **settings) -> EngineWorker:
        clock = settings.pop("clock", None) or ManualClock()
        worker = EngineWorker(
            model or tiny_model,
            EngineSettings(max_batch=max_batch, preview_every=0, **settings),
            GenerationSettings(max_steps=500),
            clock=clock,
        )
        if fits_rows is not None:
            worker.pipeline.denoiser = OutOfMemoryAbove(worker.pipeline.denoiser, fits_rows)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


Outcomes = dict[int, object]  # job id -> its GenerationResult, or the exception it raised


def run_all(
    worker: EngineWorker, requests: list[GenerationRequest], joining: dict[int, list[GenerationRequest]] | None = None
) -> tuple[Outcomes, list[tuple[int, int]]]:
    """Run ``requests`` together; ``joining[step]`` are submitted once the first job reports that step.

    Returns each job's result (or exception) and every ``(job_id, step)`` progress, in order.
    """
    joining = dict(joining or {})  # popped as the jobs are submitted
    seen: list[tuple[int, int]] = []

    async def run():
        tasks = {}

        def submit(request: GenerationRequest) -> None:
            tasks[request.job_id] = asyncio.ensure_future(worker.generate(request, on_progress))

        def on_progress(progress: Progress) -> None:
            seen.append((progress.job_id, progress.step))
            if progress.job_id == requests[0].job_id:
                for request in joining.pop(progress.step, []):
                    submit(request)

        for request in requests:
            submit(request)
        await asyncio.sleep(0)  # all waiting before the thread starts: one batch
        worker.start()
        async with asyncio.timeout(120):
            while joining or not all(task.done() for task in tasks.values()):
                await asyncio.sleep(0.01)
        return {job_id: task.exception() or task.result() for job_id, task in tasks.items()}

    return asyncio.run(run()), seen


def assert_same_images(result, reference) -> None:
    assert [image.seed for image in result.images] == [image.seed for image in reference.images]
    for image, expected in zip(result.images, reference.images, strict=False):
        assert_same_image(image.png, expected.png)


# ---------------------------------------------------------------------------- out of GPU memory


def test_a_failed_step_changes_nothing_so_it_can_be_retried(tiny_model):
    """Even a step that fails after the UNet, in the ancestral sampler's arithmetic, leaves the batch
    as it was: the retry reads the same noise and gives the same image."""
    pipeline = Pipeline(tiny_model)
    reference = pipeline.generate(make_request(1, steps=5))

    breaks = iter([False, False, True])

    class FailsOnceAfterTheUnet:
        def __getattr__(self, name):
            return getattr(pipeline.denoiser, name)

        def __call__(self, x, sigma, cond, **inputs):
            denoised = pipeline.denoiser(x, sigma, cond, **inputs)
            return denoised[..., :-1] if next(breaks, False) else denoised  # the sampler's arithmetic fails

    job = pipeline.prepare(make_request(1, steps=5))
    batch = Batch(FailsOnceAfterTheUnet())
    batch.add(job)
    failures = 0
    while not batch.entries[0].done:
        try:
            batch.step()
        except RuntimeError:
            failures += 1
    assert failures == 1
    images = pipeline.decode(batch.remove(job))
    assert np.array_equal(np.asarray(images[0]).astype(np.int16), pixels(reference.images[0].png))


def test_a_parked_job_resumes_where_it_stopped(tiny_model):
    pipeline = Pipeline(tiny_model)
    requests = [make_request(1, steps=6), make_request(2, steps=6, sampler="dpmpp_2m_karras", count=2)]
    alone = {}
    for request in requests:
        batch, job = Batch(pipeline.denoiser), pipeline.prepare(request)
        batch.add(job)
        while not batch.entries[0].done:
            batch.step()
        alone[request.job_id] = batch.remove(job)

    batch = Batch(pipeline.denoiser)
    first, second = (pipeline.prepare(request) for request in requests)
    batch.add(first)
    batch.add(second)
    batch.step()
    batch.step()
    parked = batch.park(second)  # mid-run, with its sampler history
    for _ in range(3):
        batch.step()
    batch.resume(parked)
    together = {}
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            together[entry.job.request.job_id] = batch.remove(entry.job)
    for job_id, latents in alone.items():
        assert_same_latents(together[job_id], latents)


def test_out_of_memory_retries_with_fewer_rows_and_every_job_gets_its_own_image(make_worker):
    # Long enough that the joining jobs come while both are under way, however slow the event loop.
    running = [make_request(1, steps=40), make_request(2, steps=30, sampler="euler")]
    joining = {2: [make_request(3, steps=5)], 4: [make_request(4, steps=6, count=2, sampler="dpmpp_2m_karras")]}
    reference, _ = run_all(make_worker(), running + [r for rs in joining.values() for r in rs])

    worker = make_worker(fits_rows=2)
    results, seen = run_all(worker, running, joining)

    # Job 3 joined two running jobs: 3 rows did not fit, so job 1 went on alone while job 2 was
    # parked mid-run; it resumed at the step where it stopped once job 1 was done.
    assert worker.pipeline.denoiser.refused[0] == 3
    job_2_steps = [step for job_id, step in seen if job_id == 2]
    assert job_2_steps == list(range(1, 31))
    parked_at = seen.index((1, 40))
    assert 0 < sum(job_id == 2 for job_id, _ in seen[:parked_at]) < 30
    for job_id, result in results.items():
        assert not isinstance(result, BaseException), result
        assert_same_images(result, reference[job_id])
    assert worker.generate_blocking(make_request(5, steps=2)).images  # the worker goes on


def test_only_a_job_too_big_even_alone_fails_with_a_clear_message(make_worker):
    jobs = [make_request(1), make_request(2, count=3), make_request(3, count=2)]
    reference, _ = run_all(make_worker(), [jobs[0], jobs[2]])

    results, _ = run_all(make_worker(fits_rows=2), jobs)

    too_big = results[2]
    assert isinstance(too_big, GenerationError)
    assert str(too_big) == "Out of GPU memory for 3 images of 64x64: try a smaller size or fewer images."
    assert_same_images(results[1], reference[1])
    assert_same_images(results[3], reference[3])


def test_out_of_memory_for_one_image_says_its_size(make_worker):
    worker = make_worker(fits_rows=0)
    worker.start()
    with pytest.raises(GenerationError) as error:
        worker.generate_blocking(make_request(1, width=48, height=64))
    assert str(error.value) == "Out of GPU memory for a 48x64 image: try a smaller size or fewer images."


# ---------------------------------------------------------------------------- low-precision VAE


@pytest.fixture(scope="module")
def bf16_model(tiny_sd_folder):
    """The tiny model in bfloat16, its VAE decoder broken by ``vae_fault['mode']`` (the hook is
    plain function state, so the float32 copy of the VAE shares it)."""
    model = load_model(str(tiny_sd_folder), device="cpu", dtype=torch.bfloat16, name="tiny-bf16", progress=False)
    fault = {"mode": None, "float32_calls": 0}

    def overflow(module, inputs, output):
        low_precision = output.dtype != torch.float32
        fault["float32_calls"] += not low_precision
        if fault["mode"] == "nan" and low_precision or fault["mode"] == "nan always":
            return output * float("nan")
        if fault["mode"] == "black" and low_precision:
            return torch.full_like(output, -1.0)
        return output

    model.vae.decoder.register_forward_hook(overflow)
    model.vae_fault = fault
    return model


@pytest.mark.parametrize("mode", ["nan", "black"])
def test_an_invalid_low_precision_decode_is_decoded_again_in_float32(bf16_model, make_worker, mode):
    fault = bf16_model.vae_fault
    worker = make_worker(model=bf16_model)
    worker.start()
    fault["mode"] = None
    plain = worker.generate_blocking(make_request(1))  # the bfloat16 VAE, working
    fault["mode"], calls = mode, fault["float32_calls"]
    try:
        rescued = worker.generate_blocking(make_request(1))
    finally:
        fault["mode"] = None
    assert fault["float32_calls"] == calls + 1
    image = pixels(rescued.images[0].png)
    assert image.max() > 10  # not black
    assert np.abs(image - pixels(plain.images[0].png)).max() <= 8  # the same image, at a higher precision
    assert worker.pipeline.float32_vae() is worker.pipeline.float32_vae()  # one copy, kept


def test_an_image_invalid_even_in_float32_fails_that_job_only(bf16_model, make_worker):
    fault = bf16_model.vae_fault
    worker = make_worker(model=bf16_model)
    worker.start()
    fault["mode"] = "nan always"
    try:
        with pytest.raises(GenerationError, match=r"image decoder \(VAE\) produced invalid numbers"):
            worker.generate_blocking(make_request(1))
    finally:
        fault["mode"] = None
    assert worker.generate_blocking(make_request(2)).images  # the worker goes on


# ---------------------------------------------------------------------------- time limit


def test_a_job_past_the_time_limit_fails_and_the_next_one_runs(make_worker):
    clock = ManualClock()
    worker = make_worker(max_batch=1, job_timeout=10, clock=clock)
    slow, next_one = make_request(1, steps=50), make_request(2, steps=3)

    def jump(progress: Progress) -> None:  # runs on the event loop, the worker reads the clock later
        if progress.job_id == 1 and progress.step == 3:
            clock.now += 11

    async def run():
        tasks = [asyncio.ensure_future(worker.generate(slow, jump)), asyncio.ensure_future(worker.generate(next_one))]
        await asyncio.sleep(0)
        worker.start()
        async with asyncio.timeout(120):
            return await asyncio.gather(*tasks, return_exceptions=True)

    failed, done = asyncio.run(run())
    assert isinstance(failed, GenerationError)
    assert str(failed) == "Job 1 took longer than 10 s; try fewer steps or a smaller size."
    assert done.job_id == 2 and done.images  # it waited behind job 1 (max_batch 1) and then ran


def test_a_zero_time_limit_means_none(make_worker):
    clock = ManualClock(tick=1e6)
    worker = make_worker(job_timeout=0, clock=clock)
    worker.start()
    assert worker.generate_blocking(make_request(1, steps=3)).images


# ---------------------------------------------------------------------------- stored end to end


def test_the_runner_stores_engine_faults_as_failures_with_their_reason(sqlite_queue, make_worker):
    job = dict(prompt="a red fox", guidance=5.0, width=64, height=64, sampler="euler", channel_id=1)
    ok = sqlite_queue.enqueue(requester_id=1, seed=1, steps=3, **job)
    too_big = sqlite_queue.enqueue(requester_id=2, seed=2, steps=3, count=3, **job)
    too_long = sqlite_queue.enqueue(requester_id=3, seed=3, steps=400, **job)
    # Each read of the clock is one second later: the 400-step job passes 30 s after ~30 steps.
    worker = make_worker(max_batch=8, fits_rows=2, job_timeout=30, clock=ManualClock(tick=1.0))
    worker.start()
    runner = QueueRunner(sqlite_queue, worker, worker_id="w1", poll_interval=0.05)

    async def scenario() -> None:
        task = asyncio.create_task(runner.run())
        try:
            async with asyncio.timeout(120):
                while not all(sqlite_queue.get(j.id).status.finished for j in (ok, too_big, too_long)):
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())

    assert sqlite_queue.get(ok.id).status is JobStatus.done
    assert len(sqlite_queue.images(ok.id)) == 1
    big = sqlite_queue.get(too_big.id)
    assert big.status is JobStatus.failed
    assert big.error == "Out of GPU memory for 3 images of 64x64: try a smaller size or fewer images."
    long = sqlite_queue.get(too_long.id)
    assert long.status is JobStatus.failed
    assert long.error == f"Job {too_long.id} took longer than 30 s; try fewer steps or a smaller size."
    assert sqlite_queue.images(too_big.id) == [] and sqlite_queue.images(too_long.id) == []
