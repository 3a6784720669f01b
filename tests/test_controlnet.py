"""ControlNet units per row (issue 22): against diffusers' ControlNet pipelines on the same
weights, noise and sigmas; alone and in a shared batch; loading; the preprocessors."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import cv2
import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionPipeline,
)
from PIL import Image

from engine.batching.batch import Batch
from engine.control_units import CONTROL_MODES, ControlUnit
from engine.errors import GenerationError
from engine.features.annotators import control_map
from engine.features.controlnet import residual_scales
from engine.features.controlnet_loading import ControlNets
from engine.pipeline import Pipeline
from engine.types import GenerationRequest
from tinycontrolnet import save_controlnets, save_union

STEPS = 10  # integer timesteps under "linspace" spacing, as the diffusers comparison in test_pipeline


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def nets(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    made = save_controlnets(folder, tiny_model.unet, {"edges": 1, "depth": 2, "file.safetensors": 3})
    return folder, made


@pytest.fixture(scope="module")
def pipeline(tiny_model, nets) -> Pipeline:
    return Pipeline(dataclasses.replace(tiny_model, controlnet_dir=nets[0]))  # model.controlnet_dir


def request(job_id=1, units=(), **fields) -> GenerationRequest:
    values = dict(prompt="a red fox", negative_prompt="blurry", seed=7, steps=STEPS, guidance=6.0)
    values |= dict(width=64, height=64, sampler="euler", control_units=tuple(units))
    return GenerationRequest.of(job_id, **(values | fields))


def denoise(pipeline, *requests) -> list[torch.Tensor]:
    batch = Batch(pipeline.denoiser)
    jobs = [pipeline.prepare(r) for r in requests]
    for job in jobs:
        batch.add(job)
    latents = {}
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            latents[id(entry.job)] = batch.remove(entry.job)
    return [latents[id(job)] for job in jobs]


def test_folders_and_single_files_are_listed_and_load_the_same_weights(pipeline, nets):
    assert pipeline.controlnets.names() == ["depth", "edges", "file"]
    loaded = pipeline.controlnets.get("file")
    expected = nets[1]["file.safetensors"].state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_two_units_a_weight_and_a_step_window_match_diffusers(tiny_model, pipeline):
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="linspace"
    )
    edges, depth = pipeline.controlnets.get("edges"), pipeline.controlnets.get("file")
    reference = StableDiffusionControlNetPipeline(
        vae=tiny_model.vae,
        text_encoder=tiny_model.text_encoders[0],
        tokenizer=tiny_model.tokenizers[0],
        unet=tiny_model.unet,
        controlnet=[edges, depth],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    images = [picture(1), picture(2)]
    units = (
        ControlUnit("edges", png(images[0]), resize_mode="Just Resize"),
        ControlUnit("file", png(images[1]), weight=0.6, guidance_start=0.25, guidance_end=0.65),
    )
    ours = request(units=units)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(ours.params.seed))
    theirs = reference(
        ours.params.prompt,
        negative_prompt=ours.params.negative_prompt,
        image=images,
        num_inference_steps=STEPS,
        guidance_scale=ours.params.guidance,
        height=64,
        width=64,
        latents=noise,
        controlnet_conditioning_scale=[1.0, 0.6],
        # A1111 keeps step i while i / N <= end; diffusers while (i + 1) / N <= end.
        control_guidance_start=[0.0, 0.25],
        control_guidance_end=[1.0, 0.65 + 1 / STEPS],
        output_type="latent",
    ).images
    (mine,) = denoise(pipeline, ours)
    plain = denoise(pipeline, request())[0]
    assert (mine - plain).abs().max() > 1e-2  # the units do steer the image
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_sdxl_unit_matches_diffusers(tiny_sdxl_model, tmp_path):
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="linspace"
    )
    save_controlnets(tmp_path, tiny_sdxl_model.unet, {"xl": 4})
    pipe = Pipeline(tiny_sdxl_model)
    pipe.controlnets = ControlNets(tmp_path)
    net = pipe.controlnets.get("xl")
    m = tiny_sdxl_model
    reference = StableDiffusionXLControlNetPipeline(
        vae=m.vae,
        text_encoder=m.text_encoders[0],
        text_encoder_2=m.text_encoders[1],
        tokenizer=m.tokenizers[0],
        tokenizer_2=m.tokenizers[1],
        unet=m.unet,
        controlnet=net,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )
    reference.set_progress_bar_config(disable=True)
    image = picture(5)
    ours = request(units=[ControlUnit("xl", png(image), weight=0.8, guidance_end=0.45)])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(ours.params.seed))
    theirs = reference(
        ours.params.prompt,
        negative_prompt=ours.params.negative_prompt,
        image=image,
        num_inference_steps=STEPS,
        guidance_scale=ours.params.guidance,
        height=64,
        width=64,
        latents=noise,
        controlnet_conditioning_scale=0.8,
        control_guidance_end=0.45 + 1 / STEPS,
        output_type="latent",
    ).images
    (mine,) = denoise(pipe, ours)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_a_job_gives_the_same_latents_alone_and_beside_other_units_and_none(pipeline):
    edges = ControlUnit("edges", png(picture(1)), module="canny")
    soft = ControlUnit("depth", png(picture(2)), weight=0.5, control_mode=CONTROL_MODES[2], guidance_start=0.3)
    jobs = [  # 4 steps: the depth unit's window (from 0.3) starts at the second step
        request(1, [edges], steps=4),
        request(2, [soft, edges], seed=11, prompt="a castle, (stone:1.2)", steps=4),
        request(3, seed=12, steps=4),
        request(4, [edges], sampler="dpmpp_2m", steps=3),
    ]
    alone = [denoise(pipeline, job)[0] for job in jobs]
    together = denoise(pipeline, *jobs)
    for one, shared in zip(alone, together, strict=True):
        torch.testing.assert_close(shared, one, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(alone[2], denoise(pipeline, request(3, [edges], seed=12, steps=4))[0])


def test_control_modes_scale_the_residuals_as_a1111(pipeline):
    net = pipeline.controlnets.get("edges")
    n = len(net.controlnet_down_blocks) + 1
    assert residual_scales(net, 0.5, CONTROL_MODES[0]) == [0.5] * n
    assert residual_scales(net, 0.5, CONTROL_MODES[1]) == [0.5 * 0.825 ** float(n - 1 - i) for i in range(n)]
    mine = denoise(pipeline, request(units=[ControlUnit("edges", png(picture(1)), control_mode=CONTROL_MODES[2])]))
    soft = denoise(pipeline, request(units=[ControlUnit("edges", png(picture(1)), control_mode=CONTROL_MODES[1])]))
    assert not torch.allclose(mine[0], soft[0])  # the negative prompt's rows get no residuals


def test_refusals_name_what_to_do(pipeline):
    with pytest.raises(GenerationError, match="installed: depth, edges, file"):
        pipeline.prepare(request(units=[ControlUnit("nope", png(picture(1)))]))
    with pytest.raises(GenerationError, match="'openpose' preprocessor is not installed; use one of none, canny"):
        pipeline.prepare(request(units=[ControlUnit("edges", png(picture(1)), module="openpose")]))
    with pytest.raises(GenerationError, match="control image could not be read"):
        pipeline.prepare(request(units=[ControlUnit("edges", b"not an image")]))


def test_canny_map_is_opencvs_and_resize_modes_keep_the_size():
    image = picture(9, (96, 64))
    for mode in ("Just Resize", "Crop and Resize", "Resize and Fill"):
        assert control_map(image, "none", 64, 64, mode).size == (64, 64)
    ours = np.asarray(control_map(image, "canny", 96, 64, "Just Resize"))
    edges = cv2.Canny(np.asarray(image), 100, 200)
    assert edges.any() and np.array_equal(ours[..., 0], edges) and np.array_equal(ours[..., 2], edges)


def test_infotext_writes_each_unit_as_the_a1111_extension_does(pipeline, nets):
    with open(nets[0] / "file.safetensors", "rb") as file:  # A1111's sd_models.model_hash
        file.seek(0x100000)
        short_hash = hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
    units = [
        ControlUnit("file", png(picture(1)), module="canny", weight=0.6, guidance_end=0.8),
        ControlUnit("edges", png(picture(2)), control_mode=CONTROL_MODES[1], resize_mode="Just Resize"),
    ]
    text = pipeline.generate(request(units=units, steps=2)).infotext
    first = (
        f'ControlNet 0: "Module: canny, Model: file [{short_hash}], Weight: 0.6, Resize Mode: Crop and Resize, '
        "Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 0.8, "
        'Pixel Perfect: False, Control Mode: Balanced"'
    )
    assert first in text
    second = text.split('ControlNet 1: "')[1].split('"')[0]
    # As the extension's ControlNetUnit.parse reads it back:
    parsed = dict(item.strip().split(": ") for item in second.split(","))
    assert parsed["Model"] == "edges" and parsed["Control Mode"] == CONTROL_MODES[1]
    assert parsed["Module"] == "none" and parsed["Resize Mode"] == "Just Resize"


def test_sdxl_union_unit_matches_diffusers(tiny_sdxl_model, tmp_path):
    """A union ControlNet (ControlNetUnionModel) told its control type by the preprocessor: canny is 3."""
    made = save_union(tmp_path, tiny_sdxl_model.unet, seed=6)
    pipe = Pipeline(dataclasses.replace(tiny_sdxl_model, controlnet_dir=tmp_path))
    loaded = pipe.controlnets.get("union-file")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in made.state_dict().items())
    m = tiny_sdxl_model
    reference = StableDiffusionXLControlNetUnionPipeline(
        vae=m.vae,
        text_encoder=m.text_encoders[0],
        text_encoder_2=m.text_encoders[1],
        tokenizer=m.tokenizers[0],
        tokenizer_2=m.tokenizers[1],
        unet=m.unet,
        controlnet=pipe.controlnets.get("union"),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="linspace",
        ),
        force_zeros_for_empty_prompt=False,
    )
    reference.set_progress_bar_config(disable=True)
    edges = control_map(picture(7), "canny", 64, 64, "Just Resize")
    ours = request(units=[ControlUnit("union", png(picture(7)), module="canny", weight=0.9, resize_mode="Just Resize")])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(ours.params.seed))
    theirs = reference(
        ours.params.prompt,
        negative_prompt=ours.params.negative_prompt,
        control_image=[edges],
        control_mode=[3],
        num_inference_steps=STEPS,
        guidance_scale=ours.params.guidance,
        height=64,
        width=64,
        latents=noise,
        controlnet_conditioning_scale=0.9,
        output_type="latent",
    ).images
    (mine,) = denoise(pipe, ours)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(GenerationError, match="union ControlNet 'union' is told its control type"):
        pipe.prepare(request(units=[ControlUnit("union", png(picture(7)))]))


def test_compiled_graphs_take_the_residuals_as_padded_inputs(tiny_model, nets):
    """engine.compile: a batch with ControlNet rows runs in the compiled graphs, its residuals
    padded to the bucket like every other row input, and gives the eager images."""
    import asyncio
    import functools

    from engine.config.settings import EngineSettings, GenerationSettings
    from engine.serving.worker import EngineWorker

    model = dataclasses.replace(tiny_model, controlnet_dir=nets[0])
    units = [ControlUnit("edges", png(picture(1)), module="canny", weight=0.7)]
    requests = [request(1, units, steps=2, count=2), request(2, steps=2, seed=9)]  # 3 rows: bucket 4

    def run(worker):
        async def go():
            tasks = [asyncio.ensure_future(worker.generate(r)) for r in requests]
            await asyncio.sleep(0)  # all waiting before the thread starts: one batch
            worker.start()
            async with asyncio.timeout(300):
                return await asyncio.gather(*tasks)

        try:
            return asyncio.run(go())
        finally:
            worker.stop()

    compiler = functools.partial(torch.compile, backend="eager", dynamic=False)
    compiled = EngineWorker(
        model, EngineSettings(preview_every=0, compile="default"), GenerationSettings(), compiler=compiler
    )
    results = run(compiled)
    graphs = compiled.pipeline.denoiser.graphs
    assert any(key[0] == 4 and key[-1] is True for key in graphs) and compiled.pipeline.denoiser.eager_calls == 0
    eager = run(EngineWorker(model, EngineSettings(preview_every=0), GenerationSettings()))
    for result, expected in zip(results, eager, strict=True):
        for image, reference in zip(result.images, expected.images, strict=True):
            ours = np.asarray(Image.open(io.BytesIO(image.png))).astype(int)
            theirs = np.asarray(Image.open(io.BytesIO(reference.png))).astype(int)
            assert np.abs(ours - theirs).max() <= 2


def test_the_hires_pass_is_guided_too_at_its_size(pipeline):
    """As the A1111 extension's default (hr_option "Both"): the units guide the second pass, their
    maps made at its size."""
    from engine.features.hires import SecondPass, prepare_second_pass, second_pass_request

    unit = ControlUnit("edges", png(picture(1)), module="canny")
    asked = request(units=[unit], hires_scale=2.0, steps=2)
    second = second_pass_request(asked)
    latents = torch.zeros(1, 4, 16, 16)
    job = prepare_second_pass(pipeline, SecondPass(second, asked, 2, latents=latents))
    (group,) = job.cond.control.groups
    assert group.image.shape == (1, 3, 128, 128) and group.net is pipeline.controlnets.get("edges")
    net = pipeline.controlnets.get("edges")  # a canny unit is soft there, as the extension forces it
    assert group.scales[0].tolist() == pytest.approx(residual_scales(net, 1.0, CONTROL_MODES[1]))
    plain_pass = second_pass_request(request(hires_scale=2.0, steps=2))
    plain = prepare_second_pass(pipeline, SecondPass(plain_pass, asked, 2, latents=latents))
    assert plain.cond.control is None
