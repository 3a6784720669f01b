"""SD 3.5 and Flux.1 in our batching engine against diffusers' own pipelines, on the same tiny
weights, start noise and sigmas (issue 21): the latents must agree to float precision."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image

from engine.batching.batch import Batch
from engine.errors import GenerationError
from engine.families.flux import pack, unpack
from engine.families.loading import load_model
from engine.pipeline import Pipeline
from engine.types import GenerationRequest
from tinyflow import save_flux_folder, save_sd3_folder

SIZE = 64
PROMPT = "a photo of a red cat in the forest"
#: Our float32 arithmetic against diffusers' on the same values: a few ulps per step.
ATOL = 2e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow")
    return {
        "flux-dev": save_flux_folder(root / "flux-dev", guidance_embeds=True),
        "flux-schnell": save_flux_folder(root / "flux-schnell", guidance_embeds=False),
        "sd3": save_sd3_folder(root / "sd3", with_t5=True),
        "sd3-no-t5": save_sd3_folder(root / "sd3-no-t5", with_t5=False),
    }


@pytest.fixture(scope="module")
def pipelines(folders) -> dict:
    return {name: Pipeline(load_model(str(path), device="cpu", dtype=torch.float32)) for name, path in folders.items()}


def request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, seed=7, steps=4, width=SIZE, height=SIZE, sampler="euler", guidance=3.5)
    return GenerationRequest.of(1, **(base | fields))


def run_alone(pipeline: Pipeline, job) -> torch.Tensor:
    batch = Batch(pipeline.denoiser)
    batch.add(job)
    while not batch.entries[0].done:
        batch.step()
    return batch.remove(job)


def start_noise(seed: int) -> torch.Tensor:
    return torch.randn((16, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(seed))[None]


def diffusers_flux(folder, cls=FluxPipeline, **kwargs) -> torch.Tensor:
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        max_sequence_length=pipe.tokenizer_2.model_max_length,
        output_type="latent",
        **kwargs,
    ).images
    return unpack(out, SIZE // 8, SIZE // 8)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_flux_txt2img_matches_flux_pipeline(folders, pipelines, name):
    pipeline = pipelines[name]
    ours = run_alone(pipeline, pipeline.prepare(request(steps=4, guidance=3.5)))
    theirs = diffusers_flux(folders[name], num_inference_steps=4, guidance_scale=3.5, latents=pack(start_noise(7)))
    assert ours.shape == theirs.shape == (1, 16, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_flux_dev_sigmas_are_the_pipelines_shifted_by_the_images_tokens(folders, pipelines):
    pipeline = pipelines["flux-dev"]
    for width, height, steps in ((64, 64, 4), (1024, 1024, 20), (1344, 768, 28)):
        job_schedule = pipeline.noise.job_schedule(
            None, steps, None, schedule_type="automatic", width=width, height=height
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folders["flux-dev"], subfolder="scheduler")
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift((width // 16) * (height // 16), 256, 4096, 0.5, 1.15)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        torch.testing.assert_close(job_schedule.sigmas.float(), scheduler.sigmas, atol=0, rtol=0)


@pytest.mark.parametrize(("name", "guidance"), [("sd3", 4.5), ("sd3-no-t5", 4.5), ("sd3", 0.0)])
def test_sd3_txt2img_matches_sd3_pipeline(folders, pipelines, name, guidance):
    """With and without T5; at guidance 0 (Large Turbo's) the pipeline runs no CFG at all."""
    pipeline = pipelines[name]
    ours = run_alone(pipeline, pipeline.prepare(request(steps=4, guidance=guidance, negative_prompt="blurry")))
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3-no-t5" else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(
        folders[name], torch_dtype=torch.float32, local_files_only=True, **no_t5
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=PROMPT,
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=guidance,
        latents=start_noise(7),
        max_sequence_length=pipeline.prompts.t5_tokens,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def init_image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["flux-dev", "sd3"])
def test_img2img_matches_the_img2img_pipelines_on_the_same_sigmas(folders, pipelines, name):
    """Our img2img walks A1111's tail of the schedule (``int(strength * steps) + 1`` steps of 6 at
    0.5: 4); diffusers' img2img pipelines walk ``strength * steps`` of it, so theirs at strength
    0.6 walks the same 4 sigmas. Same start noise, same init latents (the VAE's mean)."""
    pipeline = pipelines[name]
    job = pipeline.prepare(request(steps=6, strength=0.5, guidance=3.5, init_image=b"x"), init_image())
    ours = run_alone(pipeline, job)
    init = pipeline.encode_image(init_image())
    generator = torch.Generator("cpu").manual_seed(7)
    call = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=6, strength=0.6, guidance_scale=3.5)
    if name.startswith("flux"):
        pipe = FluxImg2ImgPipeline.from_pretrained(folders[name], torch_dtype=torch.float32, local_files_only=True)
        sigma = job.sigmas[0].float()
        start = pack(sigma * start_noise(7) + (1 - sigma) * init)  # the pipeline takes noised latents as they are
        call |= dict(image=init_image(), latents=start, max_sequence_length=pipe.tokenizer_2.model_max_length)
    else:
        pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(
            folders[name], torch_dtype=torch.float32, local_files_only=True
        )
        call |= dict(image=init, generator=generator, max_sequence_length=pipeline.prompts.t5_tokens)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(output_type="latent", **call).images
    if name.startswith("flux"):
        theirs = unpack(theirs, SIZE // 8, SIZE // 8)
    assert len(job.sigmas) - 1 == 4
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_flux_rows_with_other_guidance_seeds_and_steps_share_a_batch(pipelines):
    pipeline = pipelines["flux-dev"]
    jobs = [
        request(seed=7, steps=4, guidance=3.5),
        request(seed=8, steps=6, guidance=1.5, count=2),
        request(seed=9, steps=3, guidance=5.0, sampler="dpmpp_2m"),
    ]
    alone = [run_alone(pipeline, pipeline.prepare(job)) for job in jobs]
    batch, prepared = Batch(pipeline.denoiser), [pipeline.prepare(job) for job in jobs]
    for job in prepared:
        batch.add(job)
    finished = {}
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            finished[id(entry.job)] = batch.remove(entry.job)
    for job, expected in zip(prepared, alone, strict=True):
        torch.testing.assert_close(finished[id(job)], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(sampler="euler_a"), "sampler"),
        (dict(schedule="karras"), "schedule"),
        (dict(clip_skip=2), "CLIP skip"),
        (dict(negative_prompt="blurry"), "negative prompt"),
        (dict(width=72), "multiple of 16"),
    ],
)
def test_what_a_flux_model_cannot_do_is_refused_in_one_line(pipelines, fields, words):
    with pytest.raises(GenerationError, match=words):
        pipelines["flux-dev"].prepare(request(**fields))


def test_flux_generates_a_png(pipelines):
    result = pipelines["flux-schnell"].generate(request(steps=2))
    assert result.images[0].png.startswith(b"\x89PNG")


def test_flux_infotext_is_forges(pipelines):
    """Forge's ``create_infotext``: CFG scale 1 and ``Distilled CFG Scale`` for Flux dev, CFG scale 1
    alone for schnell; its "Simple" schedule names the flow families' sigmas."""
    dev = pipelines["flux-dev"].generate(request(steps=2, guidance=3.5)).infotext
    schnell = pipelines["flux-schnell"].generate(request(steps=2)).infotext
    sd3 = pipelines["sd3"].generate(request(steps=2, guidance=4.5)).infotext
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 7" in dev
    assert "Schedule type: Simple, CFG scale: 1, Seed: 7" in schnell and "Distilled" not in schnell
    assert "Schedule type: Simple, CFG scale: 4.5, Seed: 7" in sd3


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_previews_of_16_channel_latents(family):
    from engine.preview import latents_to_rgb, preview_png

    latents = torch.randn(16, 8, 12, generator=torch.Generator().manual_seed(0))
    rgb = latents_to_rgb(latents, family)
    assert rgb.shape == (8, 12, 3) and rgb.dtype == torch.uint8
    assert not torch.equal(rgb, latents_to_rgb(latents, "sd1"))  # all 16 channels count, with the bias
    assert preview_png(latents, family).startswith(b"\x89PNG")


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_the_hires_fix_runs_on_flux_with_flow_noising(pipelines, upscaler):
    """The second pass enters the flow schedule of the enlarged size through the family's noise
    model: latents interpolated, or the image enlarged and encoded again."""
    from engine.config.settings import EngineSettings, GenerationSettings
    from engine.metadata import read_parameters
    from engine.serving.worker import EngineWorker

    limits = GenerationSettings(max_width=128, max_height=128)
    worker = EngineWorker(pipelines["flux-dev"].model, EngineSettings(device="cpu", preview_every=0), limits)
    worker.start()
    try:
        job = request(steps=2, hires_scale=2.0, hires_steps=2, hires_upscaler=upscaler)
        result = worker.generate_blocking(job)
    finally:
        worker.stop()
    png = result.images[0].png
    assert Image.open(io.BytesIO(png)).size == (128, 128)
    params = read_parameters(png)
    assert (params["Hires upscale"], params["Hires upscaler"], params["Distilled CFG Scale"]) == ("2", upscaler, "3.5")
