"""DDIM as AUTOMATIC1111 (v1.6+) runs it, against its update written again here.

A1111's DDIM (``modules/sd_samplers_timesteps.py``, ``sd_samplers_timesteps_impl.py``) works on the
UNet's latents ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` at integer timesteps: the grid is
``range(0, 1000, 1000 // steps) + 1`` clipped to 999, walked from the top, each step evaluating
one grid point and moving to the next one down; the last lands on timestep 1 and is decoded as it
is. txt2img starts from unit noise; img2img keeps ``int(strength * steps)`` grid points and
noises the image to the point above them. :func:`a1111_ddim` is that loop, in A1111's variables,
with the model's noise prediction taken from the same denoiser our job runs on (at integer
timesteps), and the same noise; our job must give its latents to float precision.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.batching.batch import Batch
from engine.pipeline import Pipeline, fit_image
from engine.types import GenerationRequest


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> Pipeline:
    return Pipeline(tiny_model)


@pytest.fixture(scope="module")
def init_png() -> bytes:
    gradient = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    return buffer.getvalue()


def make_request(**fields) -> GenerationRequest:
    defaults = dict(
        prompt="a red fox", negative_prompt="blurry", seed=7, guidance=6.0, width=64, height=48, sampler="ddim"
    )
    return GenerationRequest.of(1, **(defaults | fields))


def a1111_grid(steps: int) -> list[int]:
    return [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]


def a1111_ddim(
    pipeline: Pipeline,
    job,
    steps: int,
    noise: torch.Tensor,
    init: torch.Tensor | None = None,
    strength: float | None = None,
) -> torch.Tensor:
    """A1111's DDIM (eta 0) from ``noise``: the latents it decodes."""
    alphas = pipeline.model.alphas_cumprod.double()

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        # The denoiser reads k-diffusion's x_t / sqrt(a_t) at sigma_t and returns x0.
        sigma = math.sqrt((1 - alphas[t]) / alphas[t])
        scaled = x * math.sqrt(1 + sigma**2)
        sigmas = torch.full((x.shape[0],), sigma, dtype=torch.float32)
        return (scaled - pipeline.denoiser(scaled, sigmas, job.cond)) / sigma

    timesteps = a1111_grid(steps)
    if init is None:
        x = noise
    else:
        t_enc = int(min(strength, 0.999) * steps)
        a = float(alphas[timesteps[t_enc]])
        x = init * math.sqrt(a) + noise * math.sqrt(1 - a)
        timesteps = timesteps[:t_enc]
    for index in range(len(timesteps) - 1, 0, -1):
        a_t, a_prev = float(alphas[timesteps[index]]), float(alphas[timesteps[index - 1]])
        e_t = eps(x, timesteps[index])
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e_t
    return x


def run_job(pipeline: Pipeline, request: GenerationRequest):
    job = pipeline.prepare(request)
    batch = Batch(pipeline.denoiser)
    batch.add(job)
    while not batch.entries[0].done:
        batch.step()
    return job, batch.remove(job)


def seed_noise(job) -> torch.Tensor:
    shape = job.latents.shape[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in job.seeds])


def test_twenty_steps_evaluate_951_down_to_51(pipeline):
    job = pipeline.prepare(make_request(steps=20))
    timesteps = pipeline.noise.schedule.sigma_to_t(job.sigmas.double())
    torch.testing.assert_close(timesteps, torch.arange(951, 0, -50, dtype=torch.float64))
    assert job.total_steps == 19  # model calls at 951 ... 51; the last step lands on timestep 1


@pytest.mark.parametrize("steps", [20, 30])  # 30: 1000 // 30 leaves a 31st grid point, 991 at the top
def test_txt2img_ddim_is_a1111s(pipeline, steps):
    job, ours = run_job(pipeline, make_request(steps=steps, count=2))
    expected = a1111_ddim(pipeline, job, steps, seed_noise(job))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert (ours - job.latents).abs().max() > 0.1  # it did denoise


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.6), (30, 0.75), (10, 0.999)])
def test_img2img_ddim_is_a1111s(pipeline, init_png, steps, strength):
    request = make_request(steps=steps, init_image=init_png, strength=strength)
    job, ours = run_job(pipeline, request)
    init = pipeline.encode_image(fit_image(init_png, 64, 48))
    expected = a1111_ddim(pipeline, job, steps, seed_noise(job), init=init, strength=strength)
    assert job.total_steps == int(min(strength, 0.999) * steps) - 1  # A1111 evaluates one point fewer
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fields", [dict(steps=1), dict(steps=10, strength=0.1)])
def test_where_a1111_would_not_call_the_model_the_job_still_takes_a_step(pipeline, init_png, fields):
    if "strength" in fields:
        fields["init_image"] = init_png
    job, latents = run_job(pipeline, make_request(**fields))
    assert job.total_steps == 1 and torch.isfinite(latents).all()
