"""The engine's side of prompts as members write them, on the tiny SD 1.x model: each image's
Dynamic Prompts pick by its seed (alone and in a shared batch), ``--tile``'s circular padding,
and ``--chaos``' noise, each written in the PNG as AUTOMATIC1111 writes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.batching.batch import Batch
from engine.metadata import read_parameters
from engine.pipeline import Pipeline
from engine.prompt_templates import image_prompt
from engine.sampling.seeds import slerp
from engine.types import GenerationRequest
from engine_harness import denoise_alone
from tolerance import assert_same_latents

TEMPLATE = "a {red|green|blue|golden|silver} {fox|cat|owl}"


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> Pipeline:
    return Pipeline(tiny_model)


def request(job_id: int, **fields) -> GenerationRequest:
    defaults = dict(prompt="a fox", seed=7, steps=3, guidance=6.0, width=64, height=64, sampler="euler")
    return GenerationRequest.of(job_id, **(defaults | fields))


def templated(job_id: int, seed: int, count: int) -> GenerationRequest:
    return request(job_id, prompt=image_prompt(TEMPLATE, seed), prompt_template=TEMPLATE, seed=seed, count=count)


def test_each_image_draws_its_prompt_by_its_seed_alone_and_in_a_batch(pipeline):
    grid, single = templated(1, 20, 3), templated(2, 22, 1)  # image 3 of the grid has seed 22
    picks = [image_prompt(TEMPLATE, 20 + i) for i in range(3)]
    assert len(set(picks)) > 1 and picks[2] == single.params.prompt  # the rows differ: a real test
    alone = denoise_alone(pipeline, [grid, single])
    batch, together = Batch(pipeline.denoiser), {}
    for job in (pipeline.prepare(grid), pipeline.prepare(single)):
        batch.add(job)
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            together[entry.job.request.job_id] = batch.remove(entry.job)
    assert_same_latents(together[1], alone[1])
    assert_same_latents(together[2], alone[2])
    assert_same_latents(alone[1][2:], alone[2])  # the same seed, the same pick, the same image
    # A row drawn from another prompt is another image: the picks reach the UNet.
    assert not torch.allclose(alone[1][0], alone[1][1]) or picks[0] == picks[1]
    result = pipeline.generate(grid)
    assert [read_parameters(image.png)["Prompt"] for image in result.images] == picks


def image_of(pipeline: Pipeline, job, roll: int = 0) -> np.ndarray:
    """``job`` denoised alone and decoded, its start latents first rolled ``roll`` columns."""
    job.latents = torch.roll(job.latents, roll, dims=-1)
    batch = Batch(pipeline.denoiser)
    batch.add(job)
    while not batch.entries[0].done:
        batch.step()
    (image,) = pipeline.decode(batch.remove(job))
    return np.asarray(image).astype(np.float64)


def test_tile_makes_the_left_and_right_edges_continue_into_each_other(pipeline):
    """With every convolution padding around, the image lives on a torus: start latents rolled
    by some columns give the same image rolled by as many pixels, so its right edge continues
    into its left with no seam. Without tiling the edges are walls and the roll changes it."""
    shift = 4  # latent columns: a multiple of the UNet's downsampling, half the 8-column latent
    plain_before = image_of(pipeline, pipeline.prepare(request(3, seed=5)))
    tiled = image_of(pipeline, pipeline.prepare(request(4, seed=5, tiling=True)))
    tiled_rolled = image_of(pipeline, pipeline.prepare(request(4, seed=5, tiling=True)), shift)
    plain = image_of(pipeline, pipeline.prepare(request(5, seed=5)))
    plain_rolled = image_of(pipeline, pipeline.prepare(request(5, seed=5)), shift)
    pixels_shift = shift * pipeline.latent_scale
    # Columns compared: the tiled image's last columns are the rolled one's columns just left of
    # the middle, next to its first columns; a step like any other inside the image.
    assert np.abs(np.roll(tiled, pixels_shift, axis=1) - tiled_rolled).max() <= 2, "tiled: not periodic"
    assert np.abs(np.roll(plain, pixels_shift, axis=1) - plain_rolled).mean() > 5, "untiled: periodic?"
    wrap = np.abs(tiled[:, 0] - tiled[:, -1]).mean()
    across = np.abs(tiled_rolled[:, pixels_shift] - tiled_rolled[:, pixels_shift - 1]).mean()
    assert abs(wrap - across) <= 2  # the wrap is a step inside the rolled image
    assert np.array_equal(plain, plain_before)  # the padding went back for the next job
    png = pipeline.generate(request(6, seed=5, tiling=True)).images[0].png
    assert read_parameters(png)["Tiling"] == "True"
    assert "Tiling" not in read_parameters(pipeline.generate(request(7, seed=5)).images[0].png)


def test_chaos_mixes_the_jobs_seed_with_each_images_own_as_its_png_says(pipeline):
    job = pipeline.prepare(request(7, seed=30, count=3, chaos=25))
    noise = job.latents / job.sigmas[0].item()
    shape = tuple(noise.shape[1:])
    base = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(30))
    for i in range(3):
        own = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(30 + i))
        torch.testing.assert_close(noise[i], slerp(0.25, base, own), rtol=1e-5, atol=1e-5)
    still = pipeline.prepare(request(8, seed=30, count=2, chaos=0))
    torch.testing.assert_close(still.latents[0], still.latents[1])  # chaos 0: the same start
    fields = [read_parameters(image.png) for image in pipeline.generate(request(9, seed=30, count=2, chaos=25)).images]
    assert [(f["Seed"], f["Variation seed"], f["Variation seed strength"]) for f in fields] == [
        ("30", "30", "0.25"),
        ("30", "31", "0.25"),
    ]


def test_a_flux_job_draws_each_images_prompt_too(tmp_path):
    from engine.families.loading import load_model
    from tinyflow import save_flux_folder

    folder = save_flux_folder(tmp_path / "flux", guidance_embeds=True)
    flux = Pipeline(load_model(str(folder), device="cpu", dtype=torch.float32))
    seed = next(s for s in range(100) if image_prompt(TEMPLATE, s) != image_prompt(TEMPLATE, s + 1))
    small = dict(steps=2, width=32, height=32, guidance=3.5)
    grid = request(1, prompt=image_prompt(TEMPLATE, seed), prompt_template=TEMPLATE, seed=seed, count=2, **small)
    rows = denoise_alone(flux, [grid])[1]
    for i in range(2):  # each row is the job of its own pick and seed
        one = request(2, prompt=image_prompt(TEMPLATE, seed + i), seed=seed + i, **small)
        assert_same_latents(rows[i : i + 1], denoise_alone(flux, [one])[2])
