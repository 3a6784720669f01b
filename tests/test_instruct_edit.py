"""Edits in words with an InstructPix2Pix model (issue 22): a tiny 8-channel SD 1 UNet (diffusers'
real class, saved as a diffusers folder and as a single file) against diffusers'
``StableDiffusionInstructPix2PixPipeline`` on the same weights, noise and sigmas; edits alone and
in a shared batch; what such a model refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

from engine.errors import GenerationError
from engine.families.loading import load_model
from engine.pipeline import Pipeline
from test_controlnet import STEPS, denoise, picture, png, request
from tinymodel import save_diffusers_folder, save_single_file


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory):
    folder = save_diffusers_folder(tmp_path_factory.mktemp("ip2p") / "ip2p", "sd1", seed=5, in_channels=8)
    return load_model(str(folder), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def editor(instruct_model) -> Pipeline:
    return Pipeline(instruct_model)


def edit(job_id=1, image_seed=21, **fields):
    values = dict(prompt="make it night", init_image=png(picture(image_seed)), strength=0.75)
    return request(job_id, **(values | fields))


def test_an_edit_matches_diffusers_instruct_pix2pix(instruct_model, editor):
    m = instruct_model
    reference = StableDiffusionInstructPix2PixPipeline(
        vae=m.vae,
        text_encoder=m.text_encoders[0],
        tokenizer=m.tokenizers[0],
        unet=m.unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="linspace",
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    job = edit()
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(job.params.seed))
    expected = reference(
        job.params.prompt,
        image=picture(21),
        negative_prompt=job.params.negative_prompt,
        num_inference_steps=STEPS,
        guidance_scale=job.params.guidance,
        image_guidance_scale=1.5,
        latents=noise,
        output_type="latent",
    ).images
    (mine,) = denoise(editor, job)
    (other_image,) = denoise(editor, edit(image_seed=22))
    assert (mine - other_image).abs().max() > 1e-2  # the image does steer the edit
    torch.testing.assert_close(mine, expected, atol=1e-4, rtol=1e-4)


def test_edits_keep_their_image_and_guidance_in_a_shared_batch(instruct_model):
    stronger = Pipeline(dataclasses.replace(instruct_model, image_guidance=2.5))
    jobs = [
        edit(1),
        edit(2, image_seed=23, prompt="give it a red hat", guidance=4.0, seed=11),
        edit(3, image_seed=24, count=2, seed=5, steps=6),
    ]
    alone = [denoise(stronger, job)[0] for job in jobs]
    together = denoise(stronger, *jobs)
    for one, shared in zip(alone, together, strict=True):
        torch.testing.assert_close(shared, one, atol=1e-4, rtol=1e-4)


def test_an_edit_model_refuses_what_it_cannot_do(editor):
    with pytest.raises(GenerationError, match="edits images"):
        editor.prepare(request())
    with pytest.raises(GenerationError, match="LoRAs are not applied"):
        editor.prepare(edit(prompt="make it night <lora:x:1>"))


def test_a_single_file_instruct_pix2pix_checkpoint_loads(tmp_path, instruct_model):
    path = save_single_file(tmp_path / "ip2p.safetensors", "sd1", seed=5, in_channels=8)
    model = load_model(str(path), device="cpu", dtype=torch.float32, progress=False)
    assert model.unet.config.in_channels == 8
    state, expected = model.unet.state_dict(), instruct_model.unet.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], v) for k, v in expected.items())
