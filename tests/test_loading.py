"""engine.families.loading: every source format loads, offline, to the same tensors; bad files fail clearly."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from engine.errors import ModelLoadError
from engine.families.checkpoints import detect_family
from engine.families.loading import DATA_DIR, LoadedModel, alphas_cumprod_from_config, load_model
from engine.families.sd.tokenizer import clip_tokenizer
from tinymodel import FAMILIES, build_tiny_components

CPU = dict(device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture
def no_network(monkeypatch):
    """Refuse network connections, and fail the test if one was tried (even if it was caught)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == [], "the loader tried to open a network connection"


@pytest.fixture
def single_files(tiny_sd_single_file, tiny_sd2_single_file, tiny_sdxl_single_file):
    return {"sd1": tiny_sd_single_file, "sd2": tiny_sd2_single_file, "sdxl": tiny_sdxl_single_file}


def assert_same_tensors(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert set(got) == set(want)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


# ---------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_is_the_real_vocabulary():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token_id == 49407
    assert clip_tokenizer("!").pad_token_id == 0


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_loads_every_tensor_back(family, single_files, no_network):
    model = load_model(str(single_files[family]), **CPU)
    original = build_tiny_components(family, seed=0)
    assert model.info.family == family
    assert_same_tensors(original["unet"], model.unet)
    assert_same_tensors(original["vae"], model.vae)
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    assert len(model.text_encoders) == len(model.tokenizers) == len(encoders)
    for name, loaded in zip(encoders, model.text_encoders, strict=False):
        assert type(loaded) is type(original[name])
        assert_same_tensors(original[name], loaded)


def test_folder_loads_every_tensor_back(tiny_sd_folder, no_network):
    model = load_model(str(tiny_sd_folder), **CPU)
    original = build_tiny_components("sd1", seed=0)
    for name, loaded in (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoders[0])):
        assert_same_tensors(original[name], loaded)


def test_tiny_model_fixture_describes_itself(tiny_model):
    assert isinstance(tiny_model, LoadedModel)
    info = tiny_model.info
    assert (info.name, info.family, info.prediction_type) == ("tiny-sd1", "sd1", "epsilon")
    assert (info.latent_scale, info.default_size) == (8, 64)
    assert tiny_model.vae_scaling_factor == pytest.approx(0.18215)
    assert [len(t) for t in tiny_model.tokenizers] == [49408]
    assert tiny_model.alphas_cumprod.dtype == torch.float64 and tiny_model.alphas_cumprod.shape == (1000,)
    for module in (tiny_model.unet, tiny_model.vae, *tiny_model.text_encoders):
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())


def test_tiny_model_runs_at_latent_scale_8(tiny_model):
    tokens = tiny_model.tokenizers[0]("a cat", padding="max_length", return_tensors="pt").input_ids
    context = tiny_model.text_encoders[0](tokens).last_hidden_state
    latents = torch.zeros(1, 4, 8, 8)
    assert tiny_model.unet(latents, 10, encoder_hidden_states=context).sample.shape == latents.shape
    assert tiny_model.vae.decode(latents).sample.shape == (1, 3, 64, 64)


def test_info_per_family(tiny_sd2_model, tiny_sdxl_model):
    sd2, sdxl = tiny_sd2_model.info, tiny_sdxl_model
    assert (sd2.family, sd2.prediction_type) == ("sd2", "v_prediction")
    assert (sdxl.info.family, sdxl.info.prediction_type) == ("sdxl", "epsilon")
    assert sdxl.vae_scaling_factor == pytest.approx(0.13025)
    assert [t.pad_token for t in sdxl.tokenizers] == ["<|endoftext|>", "!"]


def test_prediction_type_can_be_overridden(tiny_sd2_single_file):
    model = load_model(str(tiny_sd2_single_file), prediction_type="epsilon", **CPU)
    assert model.info.prediction_type == "epsilon"


def test_loads_in_the_requested_dtype(tiny_sd_single_file):
    model = load_model(str(tiny_sd_single_file), device="cpu", dtype=torch.bfloat16, progress=False)
    assert model.unet.dtype == model.vae.dtype == model.text_encoders[0].dtype == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float64


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_from_tensor_names(family, single_files):
    assert detect_family(single_files[family]) == family


def test_alphas_cumprod_match_diffusers():
    config = dict(EulerDiscreteScheduler.load_config(DATA_DIR / "sd1", subfolder="scheduler"))
    expected = EulerDiscreteScheduler.from_config(config).alphas_cumprod.double()
    assert torch.allclose(alphas_cumprod_from_config(config), expected, rtol=1e-5)
    linear = dict(config, beta_schedule="linear")
    assert torch.allclose(
        alphas_cumprod_from_config(linear),
        EulerDiscreteScheduler.from_config(linear).alphas_cumprod.double(),
        rtol=1e-5,
    )


# ---------------------------------------------------------------------------- shipped configs

#: Parameter counts of the released models (UNet, VAE, text encoder(s)).
RELEASED = {
    "sd1": (859_520_964, 83_653_863, [123_060_480]),
    "sd2": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_configs_describe_the_released_models(family):
    folder = DATA_DIR / family
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with init_empty_weights():  # shapes only, no memory
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [
            (CLIPTextModelWithProjection if sub.endswith("_2") else CLIPTextModel)(
                CLIPTextConfig.from_pretrained(folder / sub)
            )
            for sub in ("text_encoder", "text_encoder_2")
            if (folder / sub).is_dir()
        ]
    assert (count(unet), count(vae), [count(e) for e in encoders]) == RELEASED[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")


def test_single_file_without_its_config_uses_the_shipped_one_offline(tiny_sd_single_file, tmp_path, no_network):
    # A lone tiny file gets the full-size SD 1.5 config: shapes differ, but nothing is downloaded.
    lone = tmp_path / "lone.safetensors"
    shutil.copy(tiny_sd_single_file, lone)
    with pytest.raises(ModelLoadError, match=r"lone\.safetensors.*sd1 config in .*engine/data/sd1"):
        load_model(str(lone), **CPU)


# ---------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="nothing.safetensors: no such file"):
        load_model(str(tmp_path / "nothing.safetensors"), **CPU)


def test_truncated_file(tiny_sd_single_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_sd_single_file.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors: truncated.*download it again"):
        load_model(str(cut), **CPU)


@pytest.mark.parametrize("damage", [b"", b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"])
def test_damaged_header(damage, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage)
    with pytest.raises(ModelLoadError, match=r"bad\.safetensors: damaged"):
        load_model(str(bad), **CPU)


def test_unknown_checkpoint(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(1)}, lora)
    with pytest.raises(ModelLoadError, match=r"lora\.safetensors: not a full Stable Diffusion"):
        load_model(str(lora), **CPU)


def test_pickle_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"model\.ckpt: only \.safetensors"):
        load_model(str(ckpt), **CPU)


def test_family_mismatch(tiny_sd2_single_file):
    with pytest.raises(ModelLoadError, match="configured as family sdxl but it holds a sd2 model"):
        load_model(str(tiny_sd2_single_file), family="sdxl", **CPU)


def test_folder_without_tokenizer(tiny_sd_folder, tmp_path):
    broken = shutil.copytree(tiny_sd_folder, tmp_path / "broken")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ModelLoadError, match="broken: missing subfolder.*tokenizer"):
        load_model(str(broken), **CPU)


def test_folder_with_wrong_tokenizer(tiny_sd_folder, tmp_path):
    broken = shutil.copytree(tiny_sd_folder, tmp_path / "broken")
    for file in (broken / "tokenizer").iterdir():
        file.unlink()
    with pytest.raises(ModelLoadError, match="broken"):
        load_model(str(broken), **CPU)


def test_hub_id_offline_says_what_to_do(no_network):
    with pytest.raises(ModelLoadError, match="nobody/no-such-model: could not fetch.*offline"):
        load_model("nobody/no-such-model", **CPU)
