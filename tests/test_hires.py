"""Hires fix in the batching engine: two passes, A1111's schedule and infotext, batching, cancel, limits."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.batching.admission import over_limits
from engine.config.settings import EngineSettings, GenerationSettings
from engine.errors import GenerationError, JobCancelled
from engine.features.hires import second_pass_schedule, second_pass_steps, upscale_image
from engine.metadata import read_parameters
from engine.params import GenerationParams
from engine.pipeline import Pipeline
from engine.sampling.samplers import SAMPLERS
from engine.sampling.schedules import job_schedule
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest, Progress
from test_a1111_infotext import a1111_parse
from tolerance import assert_same_image, image_array


def make_request(job_id: int, **fields) -> GenerationRequest:
    defaults = dict(prompt=f"prompt {job_id}", seed=100 + job_id, steps=3, guidance=5.0, width=64, height=64)
    return GenerationRequest.of(job_id=job_id, **(defaults | fields))


def hires_request(job_id: int, **fields) -> GenerationRequest:
    return make_request(job_id, **({"hires_scale": 2.0, "hires_strength": 0.6} | fields))


@pytest.fixture
def make_worker(tiny_model):
    workers = []

    def make(max_batch: int = 8, **settings) -> EngineWorker:
        worker = EngineWorker(
            tiny_model, EngineSettings(max_batch=max_batch, preview_every=0, **settings), GenerationSettings()
        )
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


def image_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


def run_together(worker: EngineWorker, requests: list[GenerationRequest], seen: list | None = None) -> dict:
    """Every request waiting before the thread starts; job id -> result (or the exception)."""

    async def run():
        tasks = [asyncio.ensure_future(worker.generate(r, None if seen is None else seen.append)) for r in requests]
        await asyncio.sleep(0)
        worker.start()
        return await asyncio.gather(*tasks, return_exceptions=True)

    return {r.job_id: outcome for r, outcome in zip(requests, asyncio.run(run()), strict=True)}


# ---------------------------------------------------------------------------- the result


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos"])
def test_hires_makes_twice_the_size_with_a1111s_fields(make_worker, upscaler):
    worker = make_worker()
    worker.start()
    result = worker.generate_blocking(hires_request(1, hires_upscaler=upscaler, hires_steps=2, count=2))
    assert [image_size(image.png) for image in result.images] == [(128, 128), (128, 128)]
    parsed = a1111_parse(result.infotext)
    assert (
        parsed
        | {
            "Size-1": "64",  # A1111 writes the first pass's size ...
            "Size-2": "64",
            "Hires upscale": "2",  # ... and the factor
            "Hires steps": "2",
            "Hires upscaler": upscaler,
            "Denoising strength": "0.6",
        }
        == parsed
    )
    assert read_parameters(result.images[1].png)["Seed"] == "102"
    keys = [line.split(":")[0].strip() for line in result.infotext.splitlines()[-1].split(", ")]
    # A1111's order: its fixed fields, RNG, then the hires fields it adds while the job is set up.
    assert keys.index("Denoising strength") < keys.index("RNG") < keys.index("Hires upscale")
    assert keys.index("Hires upscale") < keys.index("Hires steps") < keys.index("Hires upscaler")


def test_the_hires_strength_and_each_upscaler_give_their_own_image(make_worker):
    worker = make_worker()
    worker.start()
    latent = worker.generate_blocking(hires_request(1)).images[0].png
    lanczos = worker.generate_blocking(hires_request(1, hires_upscaler="Lanczos")).images[0].png
    plain = worker.generate_blocking(make_request(1)).images[0].png
    assert image_size(plain) == (64, 64) and "Hires upscale" not in read_parameters(plain)
    # The second pass denoises with its own strength (a random tiny VAE's round trip is no
    # identity, so comparing with the plain image's enlargement would show nothing).
    redrawn = worker.generate_blocking(hires_request(1, hires_upscaler="Lanczos", hires_strength=1.0)).images[0].png
    assert np.abs(image_array(redrawn) - image_array(lanczos)).mean() > 1
    assert np.abs(image_array(latent) - image_array(lanczos)).mean() > 1


def test_a_hires_job_is_the_same_alone_and_sharing_both_its_batches(make_worker):
    job = hires_request(1, sampler="dpmpp_2m", hires_steps=2)
    alone = make_worker(max_batch=1)
    alone.start()
    reference = alone.generate_blocking(job)
    others = [
        make_request(2, sampler="euler_a"),  # shares the first pass's batch
        make_request(3, width=128, height=128, sampler="euler", steps=8),  # shares the second pass's
        hires_request(4, hires_upscaler="Lanczos", sampler="euler_a", count=2),
    ]
    results = run_together(make_worker(max_batch=8), [job, *others])
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    assert_same_image(results[1].images[0].png, reference.images[0].png)
    assert results[1].infotext == reference.infotext


def test_progress_counts_both_passes(make_worker):
    seen: list[Progress] = []
    run_together(make_worker(), [hires_request(1, steps=3, hires_steps=4)], seen)
    assert [(p.step, p.total) for p in seen] == [(step, 7) for step in range(1, 8)]


def test_a_hires_job_keeps_its_place_in_line_for_its_second_pass(make_worker):
    """Its second pass goes before a job of that size which arrived after it (they share a batch),
    and before one of the first size that arrived later still."""
    seen: list[Progress] = []
    requests = [hires_request(1), make_request(2, width=128, height=128), make_request(3)]
    run_together(make_worker(overtake_window=0), requests, seen)
    order = [p.job_id for p in seen]
    assert order[:3] == [1, 1, 1]  # the first pass, alone: job 2 (another size) stops job 3 joining
    assert order[3:9] == [1, 2] * 3  # job 1's second pass shares job 2's batch
    assert order[9:] == [3, 3, 3]


def test_cancel_in_the_second_pass(make_worker):
    worker = make_worker()
    worker.start()
    steps_seen = []

    def cancel_in_second_pass(progress: Progress) -> None:  # on the worker thread
        steps_seen.append(progress.step)
        if progress.step == 4:  # the second pass's first step
            worker.cancel(progress.job_id)

    with pytest.raises(JobCancelled):
        worker.generate_blocking(hires_request(1, hires_steps=10), on_progress=cancel_in_second_pass)
    assert steps_seen == [1, 2, 3, 4]
    assert worker.generate_blocking(make_request(2)).images  # the worker goes on


def test_cancel_between_the_passes(make_worker):
    worker = make_worker()
    worker.start()

    def cancel_at_the_last_first_pass_step(progress: Progress) -> None:
        if progress.step == 3:  # reported before the first pass is finished and put back in line
            worker.cancel(progress.job_id)

    with pytest.raises(JobCancelled):
        worker.generate_blocking(hires_request(1), on_progress=cancel_at_the_last_first_pass_step)


def test_the_time_limit_holds_in_the_second_pass(tiny_model):
    now = [0.0]

    def tick(progress: Progress) -> None:
        now[0] += 1  # each step takes a "second"

    worker = EngineWorker(
        tiny_model, EngineSettings(preview_every=0, job_timeout=5.5), GenerationSettings(), clock=lambda: now[0]
    )
    worker.start()
    try:
        assert worker.generate_blocking(hires_request(1, steps=4, hires_steps=4), tick).images  # 4 s a pass
        with pytest.raises(GenerationError, match="took longer"):
            worker.generate_blocking(hires_request(2, steps=4, hires_steps=8), tick)
    finally:
        worker.stop()


# ---------------------------------------------------------------------------- A1111's second pass


@pytest.mark.parametrize(("steps", "strength", "total"), [(10, 0.7, 14), (3, 0.6, 5), (20, 1.0, 20)])
def test_the_second_pass_walks_the_last_steps_of_a1111s_longer_schedule(tiny_model, steps, strength, total):
    """``setup_img2img_steps`` with the steps given: ``int(steps / min(strength, 0.999))`` in all,
    of which the pass takes exactly ``steps``."""
    noise = Pipeline(tiny_model).noise
    params = GenerationParams(prompt="", seed=0, steps=steps, hires_scale=2, hires_strength=strength)
    sampler = SAMPLERS["euler"]
    full = job_schedule(noise.schedule, sampler.discretization, total).sigmas
    second = second_pass_schedule(noise, sampler, params)
    torch.testing.assert_close(second.sigmas, full[total - steps :])
    assert second.noise_sigma == float(full[total - steps])


def test_upscale_image_enlarges_then_fits_the_latent_grid():
    image = Image.new("RGB", (60, 44), "red")
    assert upscale_image(image, 120, 88, "Lanczos").size == (120, 88)
    assert upscale_image(image, 128, 88, "Nearest").size == (128, 88)


def test_hires_size_is_a1111s_rounded_down_to_the_latent_grid():
    params = GenerationParams(prompt="", seed=0, width=512, height=768, hires_scale=1.3)
    assert params.hires_size == (664, 992)  # int(665.6) -> 664, int(998.4) -> 992
    assert not params.but(hires_scale=1.0).is_hires and not params.but(init_image=b"x").is_hires


def test_the_device_refuses_a_hires_size_over_the_limits():
    gen = GenerationSettings(max_width=1024, max_height=1024)
    params = GenerationParams(prompt="", seed=0, width=512, height=768, hires_scale=1.5)
    assert "hires" in over_limits(params, gen)
    assert over_limits(params.but(hires_scale=1.25), gen) is None
    assert "steps" in over_limits(params.but(hires_scale=1.25, hires_steps=gen.max_steps + 1), gen)


def test_pipeline_generate_refuses_a_hires_job_rather_than_skip_its_second_pass(tiny_model):
    with pytest.raises(GenerationError, match="engine worker"):
        Pipeline(tiny_model).generate(hires_request(1))


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpm2", "heun", "lcm"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_the_first_pass_knows_how_many_steps_the_second_will_take(tiny_model, sampler, steps):
    params = GenerationParams(prompt="", seed=0, sampler=sampler, steps=7, hires_scale=2, hires_steps=steps)
    schedule = second_pass_schedule(Pipeline(tiny_model).noise, SAMPLERS[sampler], params)
    assert second_pass_steps(params) == len(schedule.sigmas) - 1


def test_progress_of_a_ddim_hires_job_keeps_one_total(make_worker):
    seen: list[Progress] = []
    run_together(make_worker(), [hires_request(1, sampler="ddim", steps=4, hires_steps=4)], seen)
    assert len({p.total for p in seen}) == 1 and seen[-1].step == seen[-1].total


def test_an_sdxl_hires_job_runs_its_second_pass_at_the_enlarged_size(tiny_sdxl_model):
    """SDXL's size conditioning is encoded again at the hires size, as A1111 does."""
    worker = EngineWorker(tiny_sdxl_model, EngineSettings(preview_every=0), GenerationSettings(max_width=2048))
    worker.start()
    try:
        result = worker.generate_blocking(hires_request(1, hires_upscaler="Lanczos"))
    finally:
        worker.stop()
    assert image_size(result.images[0].png) == (128, 128)
    assert "Hires upscale: 2" in result.infotext


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_a_hires_job_on_an_inpainting_checkpoint_paints_everywhere_in_both_passes(tmp_path, upscaler):
    """A 9-channel UNet gets "paint everywhere" conditioning at the hires size, as A1111's
    ``txt2img_image_conditioning`` gives it."""
    from engine.families.loading import load_model
    from tinymodel import save_single_file

    path = save_single_file(tmp_path / "inpainting.safetensors", "sd1", in_channels=9)
    model = load_model(str(path), device="cpu", dtype=torch.float32, progress=False)
    worker = EngineWorker(model, EngineSettings(preview_every=0), GenerationSettings())
    worker.start()
    try:
        result = worker.generate_blocking(hires_request(1, hires_upscaler=upscaler))
    finally:
        worker.stop()
    assert image_size(result.images[0].png) == (128, 128)
