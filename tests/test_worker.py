"""The engine worker: continuous batching across jobs, cancel, NaN isolation, progress delivery."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engine.batching.batch import Batch
from engine.config.settings import EngineSettings, GenerationSettings
from engine.errors import GenerationError, JobCancelled
from engine.pipeline import Pipeline
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest, Progress
from engine_harness import denoise_alone
from tolerance import assert_same_image, assert_same_latents


def make_request(job_id: int, **fields) -> GenerationRequest:
    defaults = dict(
        prompt=f"prompt {job_id}", seed=100 + job_id, steps=3, guidance=5.0, width=64, height=64, sampler="euler_a"
    )
    return GenerationRequest.of(job_id=job_id, **(defaults | fields))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


@pytest.fixture
def make_worker(tiny_model):
    workers = []

    def make(max_batch: int = 8, preview_every: int = 0, **settings) -> EngineWorker:
        worker = EngineWorker(
            tiny_model,
            EngineSettings(max_batch=max_batch, preview_every=preview_every, **settings),
            GenerationSettings(),
        )
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="module")
def init_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def mixed_jobs(init_png: bytes) -> list[GenerationRequest]:
    """Jobs that differ in everything a batch allows: prompt, seed, steps, sampler, guidance, mode."""
    return [
        make_request(1, sampler="euler", steps=3),
        make_request(2, sampler="euler_a", steps=5, guidance=9.0, count=2),
        make_request(3, sampler="dpmpp_2m_karras", steps=4, negative_prompt="blurry"),
        make_request(4, sampler="ddim", steps=6, init_image=init_png, strength=0.5),
    ]


def test_a_job_denoises_the_same_alone_and_in_a_shared_batch(tiny_model, init_png):
    pipeline = Pipeline(tiny_model)
    jobs = mixed_jobs(init_png)
    alone = denoise_alone(pipeline, jobs)

    batch, together = Batch(pipeline.denoiser), {}
    prepared = [pipeline.prepare(request) for request in jobs]
    batch.add(prepared[0])
    batch.step()  # later jobs join a batch already under way, as in the worker
    for job in prepared[1:]:
        batch.add(job)
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            together[entry.job.request.job_id] = batch.remove(entry.job)
    for job_id, latents in alone.items():
        assert_same_latents(together[job_id], latents)


def test_worker_batches_jobs_and_images_match_single_runs(make_worker, init_png):
    jobs = mixed_jobs(init_png)
    alone = make_worker(max_batch=1)
    alone.start()
    single = {request.job_id: alone.generate_blocking(request) for request in jobs}

    async def together():
        worker = make_worker(max_batch=8)
        tasks = [asyncio.ensure_future(worker.generate(request)) for request in jobs]
        await asyncio.sleep(0)  # every job is waiting before the thread starts: one batch
        worker.start()
        return await asyncio.gather(*tasks)

    for result in asyncio.run(together()):
        reference = single[result.job_id]
        assert [image.seed for image in result.images] == [image.seed for image in reference.images]
        for image, expected in zip(result.images, reference.images, strict=False):
            assert_same_image(image.png, expected.png)


def progress_log(worker: EngineWorker, requests: list[GenerationRequest]) -> list[Progress]:
    seen: list[Progress] = []

    async def run():
        tasks = [asyncio.ensure_future(worker.generate(request, seen.append)) for request in requests]
        await asyncio.sleep(0)
        worker.start()
        await asyncio.gather(*tasks)

    asyncio.run(run())
    return seen


def test_jobs_share_steps_up_to_max_batch(make_worker):
    requests = [make_request(i, steps=3) for i in (1, 2, 3)]
    shared = [p.job_id for p in progress_log(make_worker(max_batch=8), requests)]
    assert shared[:3] == [1, 2, 3]  # one step advanced all three jobs
    one_row = [p.job_id for p in progress_log(make_worker(max_batch=1), requests)]
    assert one_row == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # max_batch 1: one job at a time, in arrival order


def test_jobs_of_another_size_wait_for_their_own_batch(make_worker):
    requests = [make_request(1), make_request(2, width=48, height=64), make_request(3)]
    order = [p.job_id for p in progress_log(make_worker(overtake_window=0), requests)]
    # Strict arrival order: job 3 may not overtake job 2, which does not share job 1's 64x64 batch.
    assert order == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_jobs_behind_one_of_another_size_join_the_batch_for_a_while(make_worker):
    requests = [make_request(1), make_request(2, width=48, height=64), make_request(3), make_request(4)]
    order = [p.job_id for p in progress_log(make_worker(), requests)]
    # Jobs 3 and 4 share job 1's 64x64 batch in job 2's place; job 2 goes next, not last of all.
    assert order[:3] == [1, 3, 4] and order[-3:] == [2, 2, 2]


def test_a_job_that_waited_its_overtake_window_stops_others_joining(tiny_model):
    """Past the window nothing more joins the running batch: it drains and the waiting job goes
    next, however many jobs of the batch's size keep arriving."""
    now = [0.0]
    worker = EngineWorker(
        tiny_model,
        EngineSettings(max_batch=8, preview_every=0, overtake_window=5),
        GenerationSettings(),
        clock=lambda: now[0],
    )
    seen: list[int] = []

    def step(progress: Progress) -> None:  # on the worker thread, between steps
        seen.append(progress.job_id)
        now[0] += 1  # each step takes a "second"

    async def run():
        first = [
            asyncio.ensure_future(worker.generate(make_request(1, steps=3), step)),
            asyncio.ensure_future(worker.generate(make_request(2, width=48, height=64), step)),
        ]
        await asyncio.sleep(0)
        worker.start()
        later = []
        for job_id in range(3, 13):  # a 64x64 job arrives every "second"
            while len(seen) < job_id - 2:
                await asyncio.sleep(0.01)
            later.append(asyncio.ensure_future(worker.generate(make_request(job_id, steps=3), step)))
        await asyncio.gather(*first, *later)

    try:
        asyncio.run(run())
    finally:
        worker.stop()
    second = seen.index(2)
    assert 3 in seen[:second]  # job 2 let later jobs join for a while ...
    assert seen[second : second + 3] == [2, 2, 2]  # ... then ran, alone
    # Job k arrives at clock >= k - 2 and joins only while job 2 has waited under 5: k <= 6.
    assert max(seen[:second]) <= 6 and {7, 12} <= set(seen[second:])


@pytest.mark.parametrize("family_model", ["tiny_model", "tiny_sdxl_model"])
def test_a_compiled_unet_sees_padded_batches_and_changes_no_image(family_model, request, monkeypatch):
    """engine.compile: rows are padded to a bucket (1, 2, 4, 8, 12, ...: few shapes to compile), and no image
    changes: the padding rows' outputs are dropped (SDXL's added inputs padded with them)."""
    tiny_model = request.getfixturevalue(family_model)
    real_compile, unet_rows = torch.compile, []

    def compile_for_test(module, mode, dynamic):
        assert (mode, dynamic) == ("reduce-overhead", False)
        if not isinstance(module, torch.nn.Module):
            return module  # the samplers' step: its buffers, eager (its graphs: tests/test_sampler_graphs.py)
        traced = real_compile(module, backend="eager", dynamic=False)  # dynamo traces; no code generated

        def run(**inputs):
            unet_rows.append(inputs["sample"].shape[0])
            return traced(**inputs)

        return run

    long_prompt = ", ".join(["a lighthouse on a cliff at dusk"] * 12)  # two chunks: masked rows
    requests = [
        make_request(1, steps=2, guidance=3.0),
        make_request(2, steps=3, prompt=long_prompt),
        make_request(3, steps=4, guidance=9.0, sampler="dpmpp_2m_karras"),
    ]
    monkeypatch.setattr(torch, "compile", compile_for_test)
    compiled = EngineWorker(
        tiny_model, EngineSettings(max_batch=8, preview_every=0, compile="reduce-overhead"), GenerationSettings()
    )
    monkeypatch.undo()
    eager = EngineWorker(tiny_model, EngineSettings(max_batch=8, preview_every=0), GenerationSettings())

    async def run(worker):
        tasks = [asyncio.ensure_future(worker.generate(request)) for request in requests]
        await asyncio.sleep(0)
        worker.start()
        return await asyncio.gather(*tasks)

    try:
        expected, got = asyncio.run(run(eager)), asyncio.run(run(compiled))
    finally:
        eager.stop()
        compiled.stop()
    assert unet_rows == [8, 8, 4, 2]  # 3 rows padded to 4, then 2, then 1 (prompt and negative each)
    for result, reference in zip(got, expected, strict=False):
        assert_same_image(result.images[0].png, reference.images[0].png)


def test_progress_arrives_on_the_event_loop_thread_with_previews(make_worker):
    worker = make_worker(preview_every=2)
    seen: list[tuple[Progress, int]] = []

    async def run():
        loop_thread = threading.get_ident()
        worker.start()
        result = await worker.generate(make_request(1, steps=5), lambda p: seen.append((p, threading.get_ident())))
        return loop_thread, result

    loop_thread, result = asyncio.run(run())
    assert [(p.step, p.total) for p, _ in seen] == [(i, 5) for i in range(1, 6)]
    assert all(thread == loop_thread for _, thread in seen)
    previews = {p.step: p.preview for p, _ in seen}
    assert previews[1] is None and previews[5] is None
    assert Image.open(io.BytesIO(previews[2])).size == (8, 8)  # the latent grid of a 64x64 image
    assert result.images


def test_sde_jobs_make_the_same_images_alone_and_batched(make_worker):
    """Brownian-tree noise is per image seed: what shares the batch (another SDE job at another
    step, a second-order sampler at another stage) changes nothing in a job's images."""
    jobs = [
        make_request(1, sampler="dpmpp_sde", steps=3, count=2),
        make_request(2, sampler="dpmpp_2m_sde", steps=4),
        make_request(3, sampler="dpmpp_3m_sde", steps=5, schedule="karras"),
        make_request(4, sampler="heun"),
    ]
    alone = make_worker(max_batch=1)
    alone.start()
    single = {request.job_id: alone.generate_blocking(request) for request in jobs}

    async def together():
        worker = make_worker(max_batch=8)
        tasks = [asyncio.ensure_future(worker.generate(request)) for request in jobs]
        await asyncio.sleep(0)  # every job is waiting before the thread starts: one batch
        worker.start()
        return await asyncio.gather(*tasks)

    for result in asyncio.run(together()):
        for image, reference in zip(result.images, single[result.job_id].images, strict=True):
            assert_same_image(image.png, reference.png)


def test_progress_of_a_second_order_sampler_counts_the_members_steps(make_worker):
    """Heun makes two UNet calls a step (one for the last): progress still goes 1..steps, once each."""
    worker = make_worker()
    seen: list[tuple[int, int]] = []

    async def run():
        worker.start()
        return await worker.generate(make_request(1, steps=4, sampler="heun"), lambda p: seen.append((p.step, p.total)))

    assert asyncio.run(run()).images
    assert seen == [(i, 4) for i in range(1, 5)]


def test_cancel_before_the_job_starts(make_worker):
    worker = make_worker()

    async def run():
        doomed = asyncio.ensure_future(worker.generate(make_request(1)))
        kept = asyncio.ensure_future(worker.generate(make_request(2)))
        await asyncio.sleep(0)
        assert worker.cancel(1)
        worker.start()
        return await asyncio.gather(doomed, kept, return_exceptions=True)

    doomed, kept = asyncio.run(run())
    assert isinstance(doomed, JobCancelled)
    assert kept.job_id == 2 and kept.images
    assert not worker.cancel(1)  # gone


def test_cancel_during_a_run_stops_at_the_next_step(make_worker):
    worker = make_worker()
    worker.start()
    steps_seen = []

    def cancel_at_step_2(progress: Progress) -> None:  # runs on the worker thread (blocking API)
        steps_seen.append(progress.step)
        if progress.step == 2:
            worker.cancel(progress.job_id)

    with pytest.raises(JobCancelled):
        worker.generate_blocking(make_request(1, steps=20), on_progress=cancel_at_step_2)
    assert steps_seen == [1, 2]
    assert worker.generate_blocking(make_request(2)).images  # the worker goes on


def test_cancelling_the_awaiting_task_cancels_the_job(make_worker):
    worker = make_worker()
    worker.start()

    async def run():
        started = asyncio.Event()
        task = asyncio.ensure_future(worker.generate(make_request(1, steps=40), lambda p: started.set()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await worker.generate(make_request(2))

    assert asyncio.run(run()).job_id == 2
    assert not worker.cancel(1)  # the engine dropped it


def test_a_nan_fails_only_its_own_job(make_worker):
    worker = make_worker()
    reference = make_worker(max_batch=1)
    reference.start()
    expected = reference.generate_blocking(make_request(2, steps=10))

    async def run():
        bad = asyncio.ensure_future(worker.generate(make_request(1, steps=10, guidance=float("nan"))))
        good = asyncio.ensure_future(worker.generate(make_request(2, steps=10)))
        await asyncio.sleep(0)
        worker.start()
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(run())
    assert isinstance(bad, GenerationError) and "NaN" in str(bad)
    assert_same_image(good.images[0].png, expected.images[0].png)


def test_stop_cancels_waiting_jobs(make_worker):
    worker = make_worker()

    async def run():
        task = asyncio.ensure_future(worker.generate(make_request(1)))
        await asyncio.sleep(0)
        worker.stop()
        return await asyncio.gather(task, return_exceptions=True)

    (outcome,) = asyncio.run(run())
    assert isinstance(outcome, JobCancelled)


def test_a_request_over_the_limits_is_refused(make_worker):
    worker = make_worker()
    worker.start()
    with pytest.raises(GenerationError, match="steps"):
        worker.generate_blocking(make_request(1, steps=GenerationSettings().max_steps + 1))
