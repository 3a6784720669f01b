"""Masked jobs on a plain (4-channel) checkpoint: only the feathered mask's area changes.

Checked by pixels: outside the feathered mask (the mask grown by the blur's reach) the result is
the init image, exactly; inside it the result is generated. And a masked job gives the same image
alone, among other jobs, and parked mid-run then resumed (what running out of memory does).
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from engine.batching.batch import Batch
from engine.errors import GenerationError, JobCancelled
from engine.features.masks import feather_reach
from engine.metadata import read_parameters
from engine.pipeline import Pipeline
from engine.types import GenerationRequest
from test_engine_faults import assert_same_images, make_worker, run_all  # noqa: F401 - make_worker is a fixture
from tolerance import assert_same_image, image_array

WIDTH, HEIGHT = 64, 48
#: The masked rectangle (left, top, right, bottom) in the 64x48 init image.
HOLE = (24, 16, 48, 32)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def init_image(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def rectangle_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def outside(size: tuple[int, int], box: tuple[int, int, int, int], reach: int) -> np.ndarray:
    """[h, w] bool: True farther than ``reach`` pixels (along either axis) from ``box``."""
    x1, y1, x2, y2 = box
    keep = np.ones((size[1], size[0]), dtype=bool)
    keep[max(y1 - reach, 0) : y2 + reach, max(x1 - reach, 0) : x2 + reach] = False
    return keep


def masked_request(job_id: int = 1, **fields) -> GenerationRequest:
    defaults = dict(
        prompt="a red fox",
        negative_prompt="blurry",
        seed=7,
        steps=4,
        guidance=6.0,
        width=WIDTH,
        height=HEIGHT,
        sampler="euler_a",
        init_image=png(init_image()),
        mask=png(rectangle_mask((WIDTH, HEIGHT), HOLE)),
        strength=1.0,
    )
    return GenerationRequest.of(job_id=job_id, **(defaults | fields))


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> Pipeline:
    return Pipeline(tiny_model)


@pytest.mark.parametrize("content", ["original", "fill", "latent noise", "latent nothing"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_only_the_feathered_mask_changes(pipeline, strength, content):
    result = pipeline.generate(masked_request(strength=strength, masked_content=content, mask_blur=2))
    out, init = image_array(result.images[0].png), image_array(init_image())
    assert out.shape == init.shape
    keep = outside((WIDTH, HEIGHT), HOLE, feather_reach(2))
    assert keep.sum() > 0.5 * keep.size
    assert np.array_equal(out[keep], init[keep])
    x1, y1, x2, y2 = HOLE
    assert (
        np.abs(out[y1 + 3 : y2 - 3, x1 + 3 : x2 - 3] - init[y1 + 3 : y2 - 3, x1 + 3 : x2 - 3]).mean() > 5
    )  # repainted


def test_without_blur_the_mask_is_a_hard_edge(pipeline):
    result = pipeline.generate(masked_request(mask_blur=0))
    out, init = image_array(result.images[0].png), image_array(init_image())
    keep = outside((WIDTH, HEIGHT), HOLE, 0)
    assert np.array_equal(out[keep], init[keep])


def test_transparent_means_repaint_as_white_does(pipeline):
    erased = init_image().convert("RGBA")
    erased.paste((0, 0, 0, 0), HOLE)
    white = pipeline.generate(masked_request())
    transparent = pipeline.generate(masked_request(mask=png(erased)))
    assert np.array_equal(image_array(white.images[0].png), image_array(transparent.images[0].png))


def test_a_mask_of_another_size_is_stretched_to_the_image(pipeline):
    big = rectangle_mask((WIDTH * 2, HEIGHT * 2), tuple(2 * v for v in HOLE))
    assert_same_image(
        pipeline.generate(masked_request(mask=png(big))).images[0].png,
        pipeline.generate(masked_request()).images[0].png,
    )


def test_only_masked_generates_the_area_at_the_job_size_and_pastes_it_back(pipeline):
    # A 192x144 init image with a small hole: the result keeps the init image's size.
    size, hole = (192, 144), (100, 60, 116, 76)
    request = masked_request(
        init_image=png(init_image(*size)),
        mask=png(rectangle_mask(size, hole)),
        inpaint_full_res=True,
        inpaint_padding=8,
        mask_blur=2,
    )
    result = pipeline.generate(request)
    out, init = image_array(result.images[0].png), image_array(init_image(*size))
    assert out.shape == init.shape
    keep = outside(size, hole, feather_reach(2))
    assert np.array_equal(out[keep], init[keep])
    x1, y1, x2, y2 = hole
    assert np.abs(out[y1 + 3 : y2 - 3, x1 + 3 : x2 - 3] - init[y1 + 3 : y2 - 3, x1 + 3 : x2 - 3]).mean() > 5
    fields = read_parameters(result.images[0].png)
    assert (fields["Inpaint area"], fields["Masked area padding"], fields["Mask blur"]) == ("Only masked", "8", "2")


def test_masked_jobs_write_automatic1111_inpainting_fields(pipeline):
    fields = read_parameters(pipeline.generate(masked_request(strength=0.6, masked_content="fill")).images[0].png)
    assert (fields["Denoising strength"], fields["Mask blur"], fields["Masked content"]) == ("0.6", "4", "fill")
    assert "Inpaint area" not in fields and "Masked area padding" not in fields  # "whole picture" is the default
    plain = read_parameters(pipeline.generate(masked_request()).images[0].png)
    assert "Masked content" not in plain  # "original" is AUTOMATIC1111's default, left out as it does


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(init_image=None), "A mask needs the image it applies to"),
        (dict(mask=png(Image.new("L", (WIDTH, HEIGHT), 0))), "The mask selects nothing"),
        (dict(mask=b"not an image"), "The mask could not be read"),
        (dict(masked_content="smudge"), "Unknown masked content 'smudge'"),
        (dict(mask_blur=-1), "Mask blur must be 0 to 64 pixels"),
        (dict(inpaint_padding=1000, inpaint_full_res=True), "masked area padding 0 to 256"),
    ],
)
def test_bad_masks_are_refused_with_what_to_do(pipeline, fields, message):
    with pytest.raises(GenerationError, match=message):
        pipeline.prepare(masked_request(**fields))


def run_together(pipeline: Pipeline, requests: list[GenerationRequest], park_after: int | None = None) -> dict:
    """Every request in one batch (the first job parked for a few steps after ``park_after`` steps):
    job id -> its first image's pixels."""
    batch, jobs = Batch(pipeline.denoiser), [pipeline.prepare(request) for request in requests]
    for job in jobs:
        batch.add(job)
    images, parked, steps = {}, None, 0
    while batch.entries or parked:
        batch.step()
        steps += 1
        if steps == park_after:
            parked = batch.park(jobs[0])
        if parked is not None and steps == park_after + 2:
            batch.resume(parked)
            parked = None
        for entry in [e for e in batch.entries if e.done]:
            latents = batch.remove(entry.job)
            images[entry.job.request.job_id] = pipeline.finish(entry.job, pipeline.decode(latents)).images[0].png
    return images


@pytest.mark.parametrize("park_after", [None, 2])
def test_a_masked_job_gives_the_same_image_alone_among_others_and_after_parking(pipeline, park_after):
    masked = masked_request(1, strength=0.7, sampler="dpmpp_2m_karras")
    others = [
        GenerationRequest.of(job_id=2, prompt="a boat", seed=3, steps=4, width=WIDTH, height=HEIGHT),
        GenerationRequest.of(
            job_id=3,
            prompt="a tree",
            seed=4,
            steps=9,
            width=WIDTH,
            height=HEIGHT,
            init_image=png(init_image().rotate(180)),
            strength=0.5,
            sampler="euler",
        ),
        masked_request(4, seed=11, mask=png(rectangle_mask((WIDTH, HEIGHT), (0, 0, 20, 20)))),
    ]
    together = run_together(pipeline, [masked, *others], park_after)
    for request in [masked, *others]:
        assert_same_image(together[request.job_id], pipeline.generate(request).images[0].png)


# ---------------------------------------------------------------------------- in the worker


def test_masked_jobs_survive_out_of_memory_and_cancelling_like_any_other(make_worker, pipeline):
    masked = masked_request(1, steps=30, count=2)
    joining = {
        2: [masked_request(2, steps=5, seed=21, inpaint_full_res=True)],
        3: [GenerationRequest.of(job_id=3, prompt="a boat", seed=3, steps=6, width=WIDTH, height=HEIGHT)],
    }
    reference = {request.job_id: pipeline.generate(request) for request in [masked, *joining[2], *joining[3]]}

    worker = make_worker(fits_rows=3)
    results, _ = run_all(worker, [masked], joining)
    assert worker.pipeline.denoiser.refused  # a masked job was parked at least once
    for job_id, result in results.items():
        assert not isinstance(result, BaseException), result
        assert_same_images(result, reference[job_id])

    cancelled = masked_request(4, steps=400)
    after = masked_request(5, seed=8)

    async def cancel_one():
        task = asyncio.ensure_future(worker.generate(cancelled))
        await asyncio.sleep(0.05)  # waiting or under way: either way it is taken out
        worker.cancel(4)
        with pytest.raises(JobCancelled):
            await asyncio.wait_for(task, 120)
        return await asyncio.wait_for(worker.generate(after), 120)

    assert_same_images(asyncio.run(cancel_one()), pipeline.generate(after))
