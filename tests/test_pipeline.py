"""txt2img and img2img on the tiny model: sizes, seeds, samplers, init images, families."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

from engine.errors import GenerationError
from engine.families.loading import load_model
from engine.metadata import read_parameters
from engine.pipeline import Pipeline, fit_image
from engine.sampling.samplers import SAMPLERS
from engine.types import GenerationRequest
from tolerance import assert_same_image


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> Pipeline:
    return Pipeline(tiny_model)


def make_request(**fields) -> GenerationRequest:
    defaults = dict(
        job_id=1,
        prompt="a red fox",
        negative_prompt="blurry",
        seed=7,
        steps=4,
        guidance=6.0,
        width=64,
        height=48,
        sampler="euler_a",
    )
    return GenerationRequest.of(**(defaults | fields))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def init_png() -> bytes:
    gradient = np.linspace(0, 255, 80 * 100 * 3).reshape(80, 100, 3).astype(np.uint8)
    return png_bytes(Image.fromarray(gradient))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_every_sampler_makes_images_of_the_requested_size(pipeline, init_png, sampler, mode):
    extra = {"init_image": init_png, "strength": 0.6} if mode == "img2img" else {}
    result = pipeline.generate(make_request(sampler=sampler, **extra))
    image = Image.open(io.BytesIO(result.images[0].png))
    assert image.size == (64, 48) and image.mode == "RGB"
    assert pixels(result.images[0].png).std() > 0  # not a blank image


def test_same_seed_same_pixels_other_seed_other_pixels(pipeline):
    first, again = pipeline.generate(make_request(seed=11)), pipeline.generate(make_request(seed=11))
    other = pipeline.generate(make_request(seed=12))
    assert np.array_equal(pixels(first.images[0].png), pixels(again.images[0].png))
    assert not np.array_equal(pixels(first.images[0].png), pixels(other.images[0].png))


def test_count_makes_one_image_per_seed(pipeline):
    result = pipeline.generate(make_request(seed=20, count=2))
    assert [image.seed for image in result.images] == [20, 21]
    assert read_parameters(result.images[1].png)["Seed"] == "21"
    single = pipeline.generate(make_request(seed=21))
    assert_same_image(result.images[1].png, single.images[0].png)  # the same image as seed 21 alone


def test_variation_seed_mixes_noise(pipeline):
    plain = pixels(pipeline.generate(make_request(sampler="euler")).images[0].png)
    none = pixels(
        pipeline.generate(make_request(sampler="euler", variation_seed=5, variation_strength=0.0)).images[0].png
    )
    some = pipeline.generate(make_request(sampler="euler", variation_seed=5, variation_strength=0.3))
    assert np.array_equal(plain, none)
    assert not np.array_equal(plain, pixels(some.images[0].png))
    assert read_parameters(some.images[0].png)["Variation seed"] == "5"


def test_img2img_strength_sets_how_many_steps_run(pipeline, init_png):
    job = pipeline.prepare(make_request(steps=10, init_image=init_png, strength=0.3))
    assert job.total_steps == 4  # int(0.3 * 10) + 1, as AUTOMATIC1111 counts
    assert pipeline.prepare(make_request(steps=10)).total_steps == 10


def test_bad_init_image_is_a_generation_error(pipeline):
    with pytest.raises(GenerationError, match="init image"):
        pipeline.generate(make_request(init_image=b"not an image"))


def test_init_image_is_exif_transposed_and_fitted():
    # 40x20 landscape stored with EXIF orientation 6 (rotate 90): upright it is 20x40 portrait.
    left_red = np.zeros((20, 40, 3), np.uint8)
    left_red[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = png_bytes(Image.fromarray(left_red), format="JPEG", exif=exif.tobytes(), quality=95)
    image = fit_image(data, 64, 96)
    assert image.size == (64, 96) and image.mode == "RGB"
    top, bottom = np.asarray(image)[5, 32], np.asarray(image)[90, 32]
    assert top[0] > 200 and bottom[0] < 60  # the red half went to the top, as a viewer shows it


def test_prompt_encodings_are_cached(pipeline):
    first = pipeline.prompts("a cached prompt")
    assert pipeline.prompts("a cached prompt") is first


def test_euler_matches_the_diffusers_pipeline(tiny_model, pipeline):
    """Our sampling loop against diffusers' own Euler on the same weights and noise."""
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="linspace"
    )
    assert torch.allclose(scheduler.alphas_cumprod.double(), tiny_model.alphas_cumprod.double())
    reference = StableDiffusionPipeline(
        vae=tiny_model.vae,
        text_encoder=tiny_model.text_encoders[0],
        tokenizer=tiny_model.tokenizers[0],
        unet=tiny_model.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    ours = make_request(sampler="euler", steps=10, width=64, height=64)  # 10 steps: integer timesteps
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(ours.params.seed))
    theirs = reference(
        ours.params.prompt,
        negative_prompt=ours.params.negative_prompt,
        num_inference_steps=10,
        guidance_scale=ours.params.guidance,
        height=64,
        width=64,
        latents=noise,
        output_type="np",
    ).images[0]
    mine = pixels(pipeline.generate(ours).images[0].png)
    assert np.abs(mine - np.round(theirs * 255)).max() <= 2


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def family_pipeline(request, tiny_sd2_single_file, tiny_sdxl_single_file) -> Pipeline:
    path = {"sd2": tiny_sd2_single_file, "sdxl": tiny_sdxl_single_file}[request.param]
    return Pipeline(load_model(str(path), device="cpu", dtype=torch.float32, progress=False))


def test_sd2_v_prediction_and_sdxl_generate(family_pipeline, init_png):
    txt = family_pipeline.generate(make_request(sampler="dpmpp_2m_karras"))
    img = family_pipeline.generate(make_request(init_image=init_png, strength=0.5))
    for result in (txt, img):
        assert Image.open(io.BytesIO(result.images[0].png)).size == (64, 48)
    again = family_pipeline.generate(make_request(sampler="dpmpp_2m_karras"))
    assert np.array_equal(pixels(txt.images[0].png), pixels(again.images[0].png))


def test_sdxl_size_and_crop_conditioning_follow_each_jobs_size(tiny_sdxl_model):
    """SDXL's time_ids are (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per row,
    from each job's own size, for the prompt and the negative prompt rows alike."""
    from engine.families.sd.denoiser import Conditioning

    pipeline = Pipeline(tiny_sdxl_model)
    seen: list[torch.Tensor] = []

    def spy(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    handle = tiny_sdxl_model.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        for width, height, count in ((64, 48, 2), (48, 80, 1)):
            seen.clear()
            result = pipeline.generate(make_request(width=width, height=height, count=count, steps=2))
            assert Image.open(io.BytesIO(result.images[0].png)).size == (width, height)
            assert seen
            expected = torch.tensor([[height, width, 0, 0, height, width]] * (2 * count), dtype=seen[0].dtype)
            for time_ids in seen:
                assert torch.equal(time_ids.cpu(), expected)
    finally:
        handle.remove()

    # Two jobs of different sizes keep their own rows when their conditionings are joined.
    a = pipeline.prompts.conditioning("a", "", rows=1, guidance=5.0, width=64, height=48)
    b = pipeline.prompts.conditioning("b", "", rows=2, guidance=5.0, width=48, height=80)
    joined = Conditioning.cat([a, b])
    rows = [[48, 64, 0, 0, 48, 64]] + [[80, 48, 0, 0, 80, 48]] * 2
    assert joined.added["time_ids"].tolist() == rows + rows  # prompts first, then negative prompts
