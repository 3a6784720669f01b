"""SD 3.5 and Flux.1 single files as model sites carry them load through ``load_model`` offline
and give the latents of the diffusers folder of the same weights (issue 21, points 1, 4 and 6);
float8 weight storage keeps the latents within a stated tolerance in less memory."""

from __future__ import annotations

import shutil

import pytest
import torch

from engine.batch import Batch
from engine.checkpoints import detect_family, read_safetensors_header
from engine.errors import ModelLoadError
from engine.families.flow_storage import weight_bytes
from engine.loading import load_model
from engine.pipeline import Pipeline
from engine.types import GenerationRequest
from tinyflow import (
    build_flux_components,
    save_flux_checkpoint_file,
    save_flux_folder,
    save_flux_transformer_file,
    save_sd3_checkpoint_file,
    save_sd3_folder,
    tiny_flux_single_files,
)

FP8 = torch.float8_e4m3fn
#: Our float32 arithmetic on the same weights, loaded two ways: a few ulps per step.
ATOL = 2e-4
#: Float8 (e4m3) weights against float32 ones on the tiny models, 2 steps: the largest latent
#: difference measured was about 0.05 (Flux) and 0.04 (SD 3.5), for latents of standard deviation
#: about 1; e4m3 keeps 3 mantissa bits, a relative error of up to 1/16 per weight.
FP8_ATOL = 0.15


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flowfiles")
    out = {
        "flux-dev": save_flux_folder(root / "flux-dev"),
        "sd3": save_sd3_folder(root / "sd3"),
        "flux-bare": save_flux_transformer_file(root / "flux-bare.safetensors"),
        "flux-comfy": save_flux_transformer_file(root / "flux-comfy.safetensors", prefix="model.diffusion_model."),
        "flux-aio": save_flux_checkpoint_file(root / "flux-aio.safetensors"),
        "flux-fp8": save_flux_transformer_file(root / "flux-fp8.safetensors", dtype=FP8),
        "sd3-aio": save_sd3_checkpoint_file(root / "sd3-aio.safetensors"),
        "sd3-bare": save_sd3_checkpoint_file(root / "sd3-bare.safetensors", text_encoders=False),
    }
    # No config folder beside these: the transformer's config comes from the encoders folder.
    for name in ("flux-bare", "sd3-bare"):
        shutil.rmtree(out[name].with_suffix(""))
    # The fp8 file's weights as a diffusers folder: its Linear weights through fp8 and back.
    components = build_flux_components()
    with torch.no_grad():
        for module in components["transformer"].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.to(FP8).float())
    from diffusers import FluxPipeline

    FluxPipeline(**components).save_pretrained(root / "flux-fp8-folder")
    out["flux-fp8-folder"] = root / "flux-fp8-folder"
    return out


def load(path, **kwargs):
    with tiny_flux_single_files():  # diffusers' Flux converter at tiny widths (tests/tinyflow.py)
        return load_model(str(path), device="cpu", dtype=torch.float32, progress=False, **kwargs)


def latents(model, **fields) -> torch.Tensor:
    """A 2-step job alone in a batch."""
    pipeline = Pipeline(model)
    base = dict(prompt="a photo of a red cat", seed=7, steps=2, width=64, height=64, sampler="euler", guidance=3.5)
    job = pipeline.prepare(GenerationRequest.of(1, **(base | fields)))
    batch = Batch(pipeline.denoiser)
    batch.add(job)
    while not batch.entries[0].done:
        batch.step()
    return batch.remove(job)


@pytest.fixture(scope="module")
def reference(files) -> dict:
    """The diffusers folders' latents: what every format must give."""
    return {
        "flux": latents(load(files["flux-dev"])),
        "sd3": latents(load(files["sd3"]), negative_prompt="blurry", guidance=4.5),
        "flux-fp8": latents(load(files["flux-fp8-folder"])),
    }


def test_the_family_is_read_from_the_header_without_torch(files):
    expected = {"flux-bare": "flux", "flux-comfy": "flux", "flux-aio": "flux", "sd3-aio": "sd3", "sd3-bare": "sd3"}
    assert {name: detect_family(files[name]) for name in expected} == expected


@pytest.mark.parametrize("name", ["flux-bare", "flux-comfy"])
def test_a_flux_transformer_file_takes_its_encoders_from_a_folder(files, reference, name):
    model = load(files[name], encoders=str(files["flux-dev"]))
    assert (model.info.family, model.info.guidance) == ("flux", "distilled")
    torch.testing.assert_close(latents(model), reference["flux"], atol=ATOL, rtol=0)


def test_comfys_all_in_one_flux_file_loads_its_own_encoders(files, reference):
    model = load(files["flux-aio"])
    assert not any(p.is_meta for e in model.text_encoders for p in e.parameters())
    torch.testing.assert_close(latents(model), reference["flux"], atol=ATOL, rtol=0)


def test_sd3_file_with_its_encoders(files, reference):
    model = load(files["sd3-aio"])
    assert len(model.text_encoders) == 3  # CLIP-L, CLIP-G, T5
    torch.testing.assert_close(
        latents(model, negative_prompt="blurry", guidance=4.5), reference["sd3"], atol=ATOL, rtol=0
    )


def test_sd3_file_without_encoders_takes_them_from_a_folder(files, reference):
    model = load(files["sd3-bare"], encoders=str(files["sd3"]))
    torch.testing.assert_close(
        latents(model, negative_prompt="blurry", guidance=4.5), reference["sd3"], atol=ATOL, rtol=0
    )


def test_an_fp8_file_upcast_is_the_same_model(files, reference):
    model = load(files["flux-fp8"], encoders=str(files["flux-dev"]), weights="compute")
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    assert model.info.extra["weights"] == "float32"
    torch.testing.assert_close(latents(model), reference["flux-fp8"], atol=ATOL, rtol=0)
    assert not torch.allclose(reference["flux-fp8"], reference["flux"], atol=ATOL)  # the file's rounding shows


def test_an_fp8_file_stays_in_fp8_and_is_smaller(files, reference, capsys):
    stored = load(files["flux-fp8"], encoders=str(files["flux-dev"]))  # weights = "auto"
    full = load(files["flux-fp8"], encoders=str(files["flux-dev"]), weights="compute")
    assert stored.info.extra["weights"] == "float8_e4m3fn"
    assert FP8 in {p.dtype for p in stored.unet.parameters()}
    assert stored.unet.dtype == torch.float32  # the compute dtype, each layer upcast as it runs
    fp8_bytes, full_bytes = weight_bytes(stored.unet), weight_bytes(full.unet)
    assert fp8_bytes < 0.5 * full_bytes
    torch.testing.assert_close(latents(stored), reference["flux-fp8"], atol=FP8_ATOL, rtol=0)
    with capsys.disabled():
        print(f"\ntiny Flux transformer weights: fp8 {fp8_bytes} bytes, float32 {full_bytes} bytes")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_fp8_storage_of_a_full_precision_model(files, reference, family, capsys):
    folder = files["flux-dev" if family == "flux" else "sd3"]
    model = load(folder, weights="float8_e4m3fn")
    full = load(folder)
    t5 = model.text_encoders[-1]
    assert FP8 in {p.dtype for p in t5.parameters()}  # T5 is stored in fp8 too
    assert weight_bytes(model.unet) < 0.5 * weight_bytes(full.unet)
    fields = {} if family == "flux" else dict(negative_prompt="blurry", guidance=4.5)
    ours = latents(model, **fields)
    difference = (ours - reference[family]).abs().max().item()
    assert 0 < difference < FP8_ATOL
    with capsys.disabled():
        print(f"\n{family} fp8 storage: latents differ by at most {difference:.4f} (std {reference[family].std():.3f})")


def test_a_transformer_file_without_encoders_says_which_setting_to_set(files):
    with pytest.raises(ModelLoadError) as raised:
        load(files["flux-comfy"])
    message = str(raised.value)
    assert "\n" not in message and str(files["flux-comfy"]) in message
    assert "set model.encoders" in message and "black-forest-labs/FLUX.1-dev" in message


def test_encoders_of_another_family_are_refused(files):
    with pytest.raises(ModelLoadError, match="is a SD 3.5 model.*file is a Flux.1 model"):
        load(files["flux-comfy"], encoders=str(files["sd3"]))


def test_fp8_storage_is_refused_on_sd_models(tmp_path):
    from tinymodel import save_diffusers_folder

    folder = save_diffusers_folder(tmp_path / "sd1", "sd1")
    with pytest.raises(ModelLoadError, match="float8 weight storage .* is for SD 3.5 and Flux.1 models"):
        load(folder, weights="float8_e4m3fn")


def test_the_header_says_what_the_file_holds(files):
    from engine.checkpoints import flow_contents

    bare = flow_contents(read_safetensors_header(files["flux-bare"]))
    assert (bare.prefix, bare.guidance, bare.vae, bare.text_encoders) == ("", True, False, ())
    aio = flow_contents(read_safetensors_header(files["flux-aio"]))
    assert (aio.prefix, aio.vae, aio.text_encoders, aio.has_everything) == (
        "model.diffusion_model.",
        True,
        ("clip_l", "t5xxl"),
        True,
    )
    assert flow_contents(read_safetensors_header(files["flux-fp8"])).fp8
    sd3 = flow_contents(read_safetensors_header(files["sd3-bare"]))
    assert (sd3.family, sd3.blocks, sd3.vae, sd3.has_everything) == ("sd3", {"joint_blocks": 2}, True, False)
