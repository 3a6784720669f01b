"""SD 3.5 and Flux.1 single files as model sites carry them load through ``load_model`` offline
and give the latents of the diffusers folder of the same weights (issue 21, points 1, 4 and 6);
float8 weight storage keeps the latents within a stated tolerance in less memory."""

from __future__ import annotations

import shutil

import pytest
import torch

from engine.batching.batch import Batch
from engine.errors import ModelLoadError
from engine.families.checkpoints import detect_family, read_safetensors_header
from engine.families.flow_storage import stored_in_fp8, weight_bytes
from engine.families.loading import load_model
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
#: difference measured was 0.049 (Flux) and 0.019 (SD 3.5), for latents of standard deviation
#: about 1; e4m3 keeps 3 mantissa bits, a relative error of up to 1/16 per weight.
FP8_ATOL = 0.15


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flowfiles")
    out = {
        "flux-dev": save_flux_folder(root / "flux-dev"),
        "flux-schnell": save_flux_folder(root / "flux-schnell", guidance_embeds=False),
        "schnell-bare": save_flux_transformer_file(root / "schnell-bare.safetensors", guidance_embeds=False),
        "sd3": save_sd3_folder(root / "sd3"),
        "flux-bare": save_flux_transformer_file(root / "flux-bare.safetensors"),
        "flux-comfy": save_flux_transformer_file(root / "flux-comfy.safetensors", prefix="model.diffusion_model."),
        "flux-aio": save_flux_checkpoint_file(root / "flux-aio.safetensors"),
        "flux-fp8": save_flux_transformer_file(root / "flux-fp8.safetensors", dtype=FP8),
        "sd3-aio": save_sd3_checkpoint_file(root / "sd3-aio.safetensors"),
        "sd3-bare": save_sd3_checkpoint_file(root / "sd3-bare.safetensors", text_encoders=False),
    }
    # No config folder beside these: the transformer's config comes from the encoders folder.
    for name in ("flux-bare", "sd3-bare", "schnell-bare"):
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
def folders(files) -> dict:
    """The diffusers folders, loaded once."""
    return {name: load(files[folder]) for name, folder in (("flux", "flux-dev"), ("sd3", "sd3"))}


@pytest.fixture(scope="module")
def reference(files, folders) -> dict:
    """The diffusers folders' latents: what every format must give."""
    return {
        "flux": latents(folders["flux"]),
        "sd3": latents(folders["sd3"], negative_prompt="blurry", guidance=4.5),
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


def test_an_fp8_file_stays_in_fp8_and_is_smaller(files, folders, reference, capsys):
    stored = load(files["flux-fp8"], encoders=str(files["flux-dev"]))  # weights = "auto"
    full = folders["flux"]  # the same shapes in float32
    assert stored.info.extra["weights"] == "float8_e4m3fn"
    assert FP8 in {p.dtype for p in stored.unet.parameters()}
    assert stored.unet.dtype == torch.float32  # the compute dtype, each layer upcast as it runs
    assert stored_in_fp8(stored.unet) and stored_in_fp8(stored.text_encoders[-1]) and not stored_in_fp8(full.unet)
    fp8_bytes, full_bytes = weight_bytes(stored.unet), weight_bytes(full.unet)
    assert fp8_bytes < 0.5 * full_bytes
    torch.testing.assert_close(latents(stored), reference["flux-fp8"], atol=FP8_ATOL, rtol=0)
    with capsys.disabled():
        print(f"\ntiny Flux transformer weights: fp8 {fp8_bytes} bytes, float32 {full_bytes} bytes")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_fp8_storage_of_a_full_precision_model(files, folders, reference, family, capsys):
    model = load(files["flux-dev" if family == "flux" else "sd3"], weights="float8_e4m3fn")
    full = folders[family]
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
    with pytest.raises(ModelLoadError, match="is an SD 3.5 model.*file is a Flux.1 model"):
        load(files["flux-comfy"], encoders=str(files["sd3"]))


def test_fp8_storage_is_refused_on_sd_models(tmp_path):
    from tinymodel import save_diffusers_folder

    folder = save_diffusers_folder(tmp_path / "sd1", "sd1")
    with pytest.raises(ModelLoadError, match="float8 weight storage .* is for SD 3.5 and Flux.1 models"):
        load(folder, weights="float8_e4m3fn")


def test_the_header_says_what_the_file_holds(files):
    from engine.families.checkpoints import flow_contents

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


def test_a_weight_missing_from_the_file_is_named(files, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "cut.safetensors"
    shutil.copytree(files["flux-aio"].with_suffix(""), path.with_suffix(""))
    state = load_file(files["flux-aio"])
    del state["text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    save_file(state, path)
    with pytest.raises(
        ModelLoadError, match=r"cut\.safetensors: the T5EncoderModel lacks 1 weight\(s\) \(encoder\.block\.1"
    ):
        load(path)


def test_a_file_of_an_unreleased_shape_needs_its_config_beside_it(files, tmp_path):
    path = tmp_path / "odd.safetensors"
    shutil.copy(files["flux-aio"], path)  # no config folder beside it: the shipped ones are FLUX.1's
    with pytest.raises(ModelLoadError, match=r"blocks \{'double_blocks': 1, 'single_blocks': 1\}, but the config in"):
        load(path)


def fake_header(names: list[str]) -> dict:
    return {name: {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]} for name in names}


@pytest.mark.parametrize(
    ("names", "variant"),
    [
        ([f"double_blocks.{i}.x" for i in range(19)] + [f"single_blocks.{i}.x" for i in range(38)], "flux-schnell"),
        (
            ["guidance_in.in_layer.weight"] + [f"double_blocks.{i}.x" for i in range(19)] + ["single_blocks.0.x"],
            "flux-dev",
        ),
        ([f"model.diffusion_model.joint_blocks.{i}.x" for i in range(24)], "sd3.5-medium"),
        ([f"model.diffusion_model.joint_blocks.{i}.x" for i in range(38)], "sd3.5-large"),
    ],
)
def test_the_released_variant_is_told_from_the_header(names, variant):
    from engine.families.checkpoints import flow_contents
    from engine.families.flow_files import _variant

    assert _variant(flow_contents(fake_header(names))) == variant


def test_a_flux_lora_in_bfl_names_is_not_a_model():
    from engine.families.checkpoints import flow_family

    assert flow_family(["double_blocks.0.processor.qkv_lora1.down.weight", "single_blocks.0.x"]) is None


#: Parameters of the released models (transformer, VAE, text encoders), as diffusers and
#: transformers build them from each shipped config: FLUX.1 11.9 B, SD 3.5 Large 8.1 B, Medium
#: 2.2 B (2.5 B with its 384x384 position table, a buffer), T5-XXL's encoder 4.76 B.
RELEASED = {
    "flux-dev": (11_901_408_320, 83_819_683, [123_060_480, 4_762_310_656]),
    "flux-schnell": (11_891_178_560, 83_819_683, [123_060_480, 4_762_310_656]),
    "sd3.5-medium": (2_243_171_520, 83_819_683, [123_650_304, 694_659_840, 4_762_310_656]),
    "sd3.5-large": (8_056_627_520, 83_819_683, [123_650_304, 694_659_840, 4_762_310_656]),
}


@pytest.mark.parametrize("variant", RELEASED)
def test_shipped_configs_build_the_released_models(variant):
    import json

    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from engine.families.flow_files import DATA_DIR

    folder = DATA_DIR / variant
    index = json.loads((folder / "model_index.json").read_text())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with torch.device("meta"):
        cls = FluxTransformer2DModel if variant.startswith("flux") else SD3Transformer2DModel
        transformer = cls.from_config(cls.load_config(folder / "transformer"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = []
        for name in sorted(k for k in index if k.startswith("text_encoder")):
            config = AutoConfig.from_pretrained(folder / name)
            kind = {"T5EncoderModel": T5EncoderModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
            encoders.append(kind.get(index[name][1], CLIPTextModel)(config))
    assert (count(transformer), count(vae), [count(e) for e in encoders]) == RELEASED[variant]
    assert transformer.config.get("guidance_embeds", False) == (variant == "flux-dev")


def test_encoders_from_the_hub_that_cannot_be_fetched_say_what_to_do(files):
    # The tests run with HF_HUB_OFFLINE=1 (conftest): nothing is in the hub cache for this id.
    with pytest.raises(ModelLoadError, match="could not fetch its text encoders and VAE.*set model.encoders to it"):
        load(files["flux-comfy"], encoders="nobody/no-such-flux")


def test_prompt_encoders_on_another_device_than_the_model(folders):
    """engine.text_encoders = "cpu": token ids go to the encoders' device, results to the model's
    (the meta device stands for a GPU here: the encoders run on the CPU, the results land there)."""
    from engine.families.flux import FluxPrompts
    from engine.families.sd3 import SD3Prompts

    meta = torch.device("meta")
    flux = folders["flux"]
    encoded = FluxPrompts(flux.text_encoders, flux.tokenizers, meta, torch.float32)("a red cat")
    assert encoded.hidden.device == encoded.pooled.device == meta
    sd3 = folders["sd3"]
    width = sd3.unet.config.joint_attention_dim
    hidden, pooled = SD3Prompts(sd3.text_encoders, sd3.tokenizers, meta, torch.float32, width)("a red cat")
    assert hidden.device == pooled.device == meta


def test_an_encoders_hub_id_is_fetched_for_what_the_file_lacks_only(files):
    from engine.families.checkpoints import flow_contents
    from engine.families.flow_files import _wanted
    from engine.families.flow_loading import ENCODER_FILES

    wanted = {
        name: _wanted(flow_contents(read_safetensors_header(files[name])))
        for name in files
        if files[name].suffix == ".safetensors"
    }
    assert wanted["flux-aio"] == ("tokenizer_2",)  # T5's tokenizer only, not the 9.5 GB T5 the file has
    assert wanted["flux-bare"] == wanted["flux-fp8"] == wanted["sd3-bare"] == ENCODER_FILES
    no_t5 = fake_header(["model.diffusion_model.joint_blocks.0.x", "first_stage_model.x"])
    no_t5 |= fake_header(["text_encoders.clip_l.transformer.x", "text_encoders.clip_g.transformer.x"])
    assert _wanted(flow_contents(no_t5)) == ("text_encoder_3", "tokenizer_3")


def test_the_cli_generates_from_a_transformer_file_with_encoders(files, tmp_path, capsys):
    from PIL import Image

    from engine.__main__ import main

    out = tmp_path / "fox.png"
    args = ["generate", "--model", str(files["flux-comfy"]), "--encoders", str(files["flux-dev"])]
    args += ["--config", str(tmp_path / "absent.toml"), "--prompt", "a red fox", "--steps", "2"]
    args += ["--width", "64", "--height", "64", "--out", str(out)]
    with tiny_flux_single_files():
        assert main(args[:3] + args[5:]) == 1  # without --encoders (and none in the config)
        assert "set model.encoders" in capsys.readouterr().err
        assert main(args) == 0
    assert Image.open(out).size == (64, 64)


def test_comfys_scaled_fp8_files_are_refused(files, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(files["flux-fp8"])
    state["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(1)
    save_file(state, tmp_path / "scaled.safetensors")
    with pytest.raises(ModelLoadError, match=r"scaled\.safetensors: a ComfyUI \"scaled fp8\" file"):
        load(tmp_path / "scaled.safetensors", encoders=str(files["flux-dev"]))


def test_a_schnell_file_with_devs_encoders_is_schnell(files):
    """dev and schnell share their encoders and VAE: a schnell transformer file with FLUX.1-dev's
    folder as encoders follows the file (no guidance embedding; schnell's static shift of 1)."""
    model = load(files["schnell-bare"], encoders=str(files["flux-dev"]))
    assert model.info.guidance == "none" and not model.unet.config.guidance_embeds
    assert (model.scheduler_config["shift"], model.scheduler_config["use_dynamic_shifting"]) == (1.0, False)
    want = latents(load(files["flux-schnell"]))
    torch.testing.assert_close(latents(model), want, atol=ATOL, rtol=0)
