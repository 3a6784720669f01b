"""The new samplers inside the batching engine, on the tiny UNet: the same as k-diffusion's loop,
the same alone and batched (with other samplers, other steps, jobs joining late and parked), and
progress in the member's steps.
"""

from __future__ import annotations

import pytest
import torch

from engine.batching.batch import Batch
from engine.params import SAMPLER_NAMES
from engine.pipeline import Pipeline
from engine.sampling.samplers import SAMPLERS
from engine.types import GenerationRequest
from engine_harness import denoise_alone
from kdiffusion_ref import sampling as K
from tolerance import assert_same_latents


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> Pipeline:
    return Pipeline(tiny_model)


def make_request(job_id: int, **fields) -> GenerationRequest:
    defaults = dict(
        prompt=f"prompt {job_id}", seed=300 + job_id, steps=4, guidance=5.0, width=64, height=64, sampler="heun"
    )
    return GenerationRequest.of(job_id=job_id, **(defaults | fields))


def run_alone(pipeline: Pipeline, request: GenerationRequest):
    job = pipeline.prepare(request)
    batch = Batch(pipeline.denoiser)
    batch.add(job)
    while not batch.entries[0].done:
        batch.step()
    return job, batch.entries[0], batch.remove(job)


KDIFFUSION = {
    "heun": (K.sample_heun, None),
    "lms": (K.sample_lms, None),
    "dpm2": (K.sample_dpm_2, None),
    "dpm2_a": (K.sample_dpm_2_ancestral, "ancestral"),
    "dpmpp_sde": (K.sample_dpmpp_sde, "brownian"),
    "dpmpp_2m_sde": (K.sample_dpmpp_2m_sde, "brownian"),
    "dpmpp_3m_sde": (K.sample_dpmpp_3m_sde, "brownian"),
    "dpmpp_2m": (K.sample_dpmpp_2m, None),
}


@pytest.mark.parametrize("name", list(KDIFFUSION))
def test_a_job_in_the_engine_matches_kdiffusion_on_the_tiny_unet(pipeline, name):
    """Our batch, with our denoiser (UNet + guidance), against k-diffusion's loop with the same denoiser,
    sigmas, start latents and noise: each image's own generator, or a Brownian tree per image seed."""
    request = make_request(1, sampler=name, count=2, steps=4)
    job, _, ours = run_alone(pipeline, request)
    function, noise = KDIFFUSION[name]
    job = pipeline.prepare(request)
    kwargs = {}
    if noise == "ancestral":  # each image's own generator, after its draw of the initial noise
        generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
        shape = job.latents.shape[1:]
        for g in generators:
            torch.randn(shape, generator=g)
        kwargs["noise_sampler"] = lambda *_: torch.stack([torch.randn(shape, generator=g) for g in generators])
    elif noise == "brownian":
        sigmas = job.sigmas
        kwargs["noise_sampler"] = K.BrownianTreeNoiseSampler(
            job.latents, sigmas[sigmas > 0].min(), sigmas.max(), seed=job.seeds
        )
    with torch.inference_mode():
        reference = function(
            lambda x, sigma: pipeline.denoiser(x, sigma, job.cond),
            job.latents.float(),
            job.sigmas,
            disable=True,
            **kwargs,
        )
    # DPM++ 2M's step (ours since before these samplers) is written in another, equal form: its
    # rounding differs by a little more than 1e-5 on the UNet's values.
    tolerance = 1e-4 if name == "dpmpp_2m" else 1e-5
    torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance)


def mixed_jobs(init_png: bytes | None = None) -> list[GenerationRequest]:
    """Every new sampler at once, with different steps, counts, schedule types and modes."""
    return [
        make_request(1, sampler="heun", steps=3),
        make_request(2, sampler="dpmpp_sde", steps=4, count=2),
        make_request(3, sampler="dpmpp_2m_sde", steps=5, schedule="karras"),
        make_request(4, sampler="dpmpp_3m_sde", steps=6, schedule="sgm_uniform"),
        make_request(5, sampler="lms", steps=5, schedule="simple"),
        make_request(6, sampler="dpm2_a", steps=4, count=2),
        make_request(7, sampler="dpm2", steps=3, schedule="exponential"),
        make_request(8, sampler="lcm", steps=4),
        make_request(9, sampler="euler_a", steps=5),
        make_request(10, sampler="dpmpp_2m_sde", steps=6, init_image=init_png, strength=0.6),
        make_request(11, sampler="unipc", steps=5, schedule="karras"),
    ]


@pytest.fixture(scope="module")
def init_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_job_denoises_the_same_alone_and_batched_with_the_others(pipeline, init_png):
    """Rows at different stages, with different history and noise sources, in one UNet call per
    engine step; jobs join late, and one is parked mid-run and resumed."""
    jobs = mixed_jobs(init_png)
    alone = denoise_alone(pipeline, jobs)

    batch, together = Batch(pipeline.denoiser), {}
    prepared = [pipeline.prepare(request) for request in jobs]
    batch.add(prepared[0])
    batch.step()  # heun's first stage: the others join a batch in the middle of a member step
    for job in prepared[1:5]:
        batch.add(job)
    batch.step()
    parked = batch.park(prepared[1])  # dpmpp_sde after its stage 0, as the worker parks on out-of-memory
    for job in prepared[5:]:
        batch.add(job)
    batch.step()
    batch.resume(parked)
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            together[entry.job.request.job_id] = batch.remove(entry.job)
    assert together.keys() == alone.keys()
    for job_id, latents in alone.items():
        assert_same_latents(together[job_id], latents)


@pytest.mark.parametrize(
    ("name", "steps", "engine_steps"),
    [("heun", 4, 7), ("dpmpp_sde", 4, 7), ("dpm2_a", 5, 9), ("lms", 4, 4), ("dpmpp_3m_sde", 5, 5)],
)
def test_progress_counts_the_members_steps(pipeline, name, steps, engine_steps):
    """A second-order step is two UNet calls (one for the last, Euler step), but one step of progress."""
    job, entry, _ = run_alone(pipeline, make_request(1, sampler=name, steps=steps))
    assert job.total_steps == steps and job.engine_steps == engine_steps
    assert entry.step == steps and entry.engine_step == engine_steps


def test_brownian_noise_is_per_image_seed(pipeline):
    """Image i of a job has the noise of seed + i: the same seed gives the same image as image 0 of
    another job, and the two images of one job differ."""
    _, _, pair = run_alone(pipeline, make_request(1, sampler="dpmpp_2m_sde", seed=40, count=2))
    _, _, second = run_alone(pipeline, make_request(2, prompt="prompt 1", sampler="dpmpp_2m_sde", seed=41))
    assert_same_latents(pair[1:], second)
    assert (pair[0] - pair[1]).abs().max() > 0.1


def test_every_sampler_has_its_automatic1111_label():
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    assert [
        SAMPLER_NAMES[name]
        for name in ("dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde", "heun", "lms", "dpm2", "dpm2_a", "unipc", "lcm")
    ] == ["DPM++ 2M SDE", "DPM++ SDE", "DPM++ 3M SDE", "Heun", "LMS", "DPM2", "DPM2 a", "UniPC", "LCM"]
