"""IP-Adapter references per row (issue 22): against diffusers' ``load_ip_adapter`` pipelines on the
same weights, noise and sigmas (plain and Plus, a scale below 1, InstantStyle's style block, SDXL);
alone and in a shared batch with other references, strengths, modes and none."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from engine.control_units import ControlUnit
from engine.errors import GenerationError
from engine.features.ip_adapter import layer_scales, style_spec
from engine.pipeline import Pipeline
from test_controlnet import STEPS, denoise, picture, png, request
from tinyipadapter import save_image_encoder, save_ip_adapter


def scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="linspace"
    )


def with_adapter(model, folder, name: str):
    """The model with its own UNet (processors are installed in it) and ``name`` as its adapter."""
    return dataclasses.replace(
        model,
        unet=copy.deepcopy(model.unet),
        ip_adapter=folder / f"{name}.safetensors",
        image_encoder=folder / "image_encoder",
    )


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip_adapters")
    save_image_encoder(folder)
    save_ip_adapter(folder, tiny_model.unet, "plain", plus=False, seed=1)
    save_ip_adapter(folder, tiny_model.unet, "plus", plus=True, seed=2)
    return folder


@pytest.fixture(scope="module")
def plain(tiny_model, adapters) -> Pipeline:
    return Pipeline(with_adapter(tiny_model, adapters, "plain"))


def reference_unit(name: str, seed: int, weight: float = 1.0, mode: str = "ip-adapter_clip") -> ControlUnit:
    return ControlUnit(name, png(picture(seed)), module=mode, weight=weight)


def theirs(model, folder, name: str, scale, job, pipeline_class=StableDiffusionPipeline, **components):
    pipe = pipeline_class(
        vae=model.vae,
        unet=copy.deepcopy(model.unet),
        scheduler=scheduler(),
        feature_extractor=None,
        image_encoder=None,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=f"{name}.safetensors")
    pipe.set_ip_adapter_scale(scale)
    params = job.params
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(params.seed))
    return pipe(
        params.prompt,
        negative_prompt=params.negative_prompt,
        ip_adapter_image=picture(11),  # every job here refers to picture 11
        num_inference_steps=STEPS,
        guidance_scale=params.guidance,
        height=64,
        width=64,
        latents=noise,
        output_type="latent",
    ).images


def sd_components(model) -> dict:
    return dict(
        text_encoder=model.text_encoders[0],
        tokenizer=model.tokenizers[0],
        safety_checker=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize(
    ("name", "weight", "mode"),
    [("plain", 0.7, "ip-adapter_clip"), ("plus", 1.0, "ip-adapter_clip"), ("plain", 1.3, "ip-adapter_style")],
)
def test_a_reference_matches_diffusers_load_ip_adapter(tiny_model, adapters, plain, name, weight, mode):
    ours = plain if name == "plain" else Pipeline(with_adapter(tiny_model, adapters, name))
    job = request(units=(reference_unit(name, 11, weight, mode),))
    scale = weight
    if mode == "ip-adapter_style":
        spec = style_spec(ours.model.unet)
        assert spec == {"up": {"block_1": [0.0, 1.0]}}  # the tiny SD1 UNet's first up block with attention
        scale = {"up": {"block_1": [weight * s for s in spec["up"]["block_1"]]}}
    expected = theirs(tiny_model, adapters, name, scale, job, **sd_components(tiny_model))
    (mine,) = denoise(ours, job)
    (unguided,) = denoise(ours, request())
    assert (mine - unguided).abs().max() > 1e-2  # the reference does steer the image
    torch.testing.assert_close(mine, expected, atol=1e-4, rtol=1e-4)


def test_sdxl_style_reference_matches_diffusers(tiny_sdxl_model, tmp_path):
    m = tiny_sdxl_model
    save_image_encoder(tmp_path)
    save_ip_adapter(tmp_path, m.unet, "xl", plus=False, seed=3)
    ours = Pipeline(with_adapter(m, tmp_path, "xl"))
    job = request(units=(reference_unit("xl", 11, 0.8, "ip-adapter_style"),))
    spec = style_spec(ours.model.unet)
    assert spec == {"up": {"block_0": [0.0, 1.0]}}  # SDXL's style block, in the tiny UNet's layout
    components = dict(
        text_encoder=m.text_encoders[0],
        text_encoder_2=m.text_encoders[1],
        tokenizer=m.tokenizers[0],
        tokenizer_2=m.tokenizers[1],
    )
    scale = {"up": {"block_0": [0.0, 0.8]}}
    expected = theirs(m, tmp_path, "xl", scale, job, StableDiffusionXLPipeline, **components)
    (mine,) = denoise(ours, job)
    torch.testing.assert_close(mine, expected, atol=1e-4, rtol=1e-4)


def test_rows_keep_their_reference_in_a_shared_batch(plain):
    jobs = [
        request(1, units=(reference_unit("plain", 11, 0.6),)),
        request(2, seed=9),  # no reference
        request(3, units=(reference_unit("plain", 12, 1.2, "ip-adapter_style"),), seed=3),
        request(4, units=(reference_unit("plain", 13, 0.3),), seed=5, steps=6),
    ]
    alone = [denoise(plain, job)[0] for job in jobs]
    together = denoise(plain, *jobs)
    for one, shared in zip(alone, together, strict=True):
        torch.testing.assert_close(shared, one, atol=1e-4, rtol=1e-4)  # the suite's batching tolerance


def test_layer_scales_follow_set_ip_adapter_scale(plain):
    unet = plain.model.unet
    assert layer_scales(unet, 0.5) == [0.5] * len(layer_scales(unet, 1.0))
    assert sorted(set(layer_scales(unet, style_spec(unet)))) == [0.0, 1.0]
    assert sum(layer_scales(unet, style_spec(unet))) == 1.0  # one layer


def test_a_model_without_an_adapter_or_another_name_is_refused(tiny_model, plain):
    with pytest.raises(GenerationError, match="no IP-Adapter"):
        Pipeline(tiny_model).prepare(request(units=(reference_unit("plain", 11),)))
    with pytest.raises(GenerationError, match="Unknown IP-Adapter"):
        plain.prepare(request(units=(reference_unit("other", 11),)))
