"""tests/tinyflow.py: the tiny Flux.1 and SD 3.5 models load with diffusers' own pipelines, offline,
in every format written, to the very tensors that were built."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.loaders.single_file_utils import (
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file

from tinyflow import (
    build_flux_components,
    build_sd3_components,
    save_flux_checkpoint_file,
    save_flux_folder,
    save_flux_transformer_file,
    save_sd3_checkpoint_file,
    save_sd3_folder,
    t5_tokenizer,
    tiny_flux_single_files,
)
from tinyflow_keys import sd3_to_sai

MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
FLUX_KINDS = {"dev": True, "schnell": False}  # kind -> guidance_embeds


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
    assert attempts == [], "diffusers tried to open a network connection"


@pytest.fixture(scope="module")
def flux():
    """kind -> the components as built (seed 0), once per module."""
    return {kind: build_flux_components(guidance) for kind, guidance in FLUX_KINDS.items()}


@pytest.fixture(scope="module")
def sd3():
    return build_sd3_components(with_t5=True)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tinyflow")


def assert_same_tensors(want: dict, got: dict, name: str = "") -> None:
    assert set(got) == set(want), name
    assert [k for k in want if got[k].is_meta or not torch.equal(want[k], got[k])] == [], name


def assert_same_modules(expected: dict, loaded) -> None:
    """Every weight of every model component equal, key for key."""
    for name in MODULES:
        want = expected.get(name)
        got = getattr(loaded, name, None)
        if want is None:
            assert got is None, name
            continue
        assert_same_tensors(want.state_dict(), got.state_dict(), name)


def fp8_cast(module: torch.nn.Module) -> dict:
    """The weights as an fp8 file holds them: Linear weights through float8_e4m3fn and back."""
    linears = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    state = module.state_dict()
    return {k: v.to(torch.float8_e4m3fn).float() if k in linears else v for k, v in state.items()}


def tie_t5(pipe, name: str):
    """diffusers loads a file's T5 ``shared.weight`` only; transformers 5 gives the encoder stack
    its own embedding, left on the meta device until tied (see tests/tinyflow.py)."""
    t5 = getattr(pipe, name)
    assert t5.encoder.embed_tokens.weight.is_meta
    t5.tie_weights()
    return pipe


def generate(pipe, **kwargs) -> np.ndarray:
    return pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images


# ---------------------------------------------------------------------------- T5 tokenizer


def test_t5_tokenizer_has_t5s_layout(flux):
    tokenizer = t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=8).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>", "<pad>", "<pad>"]
    assert tokenizer.decode(tokenizer("A Zebra, 2 cats!").input_ids, skip_special_tokens=True) == "A Zebra, 2 cats!"
    assert flux["dev"]["text_encoder_2"].config.vocab_size == len(tokenizer)


def test_builders_are_deterministic_per_seed(flux):
    again = build_flux_components(guidance_embeds=True, seed=0)["transformer"].state_dict()
    assert all(torch.equal(again[k], v) for k, v in flux["dev"]["transformer"].state_dict().items())
    other = build_flux_components(guidance_embeds=True, seed=1)["transformer"].state_dict()
    assert not torch.equal(other["x_embedder.weight"], again["x_embedder.weight"])
    for name in ("vae", "text_encoder", "text_encoder_2"):  # shared by dev and schnell, as the real ones
        assert_same_tensors(flux["dev"][name].state_dict(), flux["schnell"][name].state_dict(), name)


# ---------------------------------------------------------------------------- diffusers folders


@pytest.mark.parametrize("kind", FLUX_KINDS)
def test_flux_folder_loads_offline_and_generates(kind, flux, models_dir, no_network):
    folder = save_flux_folder(models_dir / f"flux-{kind}", guidance_embeds=FLUX_KINDS[kind])
    pipe = FluxPipeline.from_pretrained(folder)
    assert_same_modules(flux[kind], pipe)
    assert pipe.transformer.config.guidance_embeds is FLUX_KINDS[kind]
    assert pipe.scheduler.config.use_dynamic_shifting is FLUX_KINDS[kind]
    assert len(pipe.tokenizer_2) == pipe.text_encoder_2.config.vocab_size

    image = generate(pipe, guidance_scale=3.5)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    if kind == "dev":  # the distilled guidance value reaches the transformer
        assert not np.array_equal(image, generate(pipe, guidance_scale=1.0))


def test_sd3_folder_loads_offline_and_generates(sd3, models_dir, no_network):
    pipe = StableDiffusion3Pipeline.from_pretrained(save_sd3_folder(models_dir / "sd3"))
    assert_same_modules(sd3, pipe)
    image = generate(pipe, negative_prompt="blurry", guidance_scale=5.0)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_sd3_folder_without_t5_loads_the_way_diffusers_allows(sd3, models_dir, no_network):
    # StableDiffusion3Pipeline does not list T5 as optional: a folder without it (model_index.json
    # says null) loads only when the caller passes text_encoder_3=None, tokenizer_3=None.
    folder = save_sd3_folder(models_dir / "sd3-no-t5", with_t5=False)
    assert not (folder / "text_encoder_3").exists()
    with pytest.raises(ValueError, match="text_encoder_3"):
        StableDiffusion3Pipeline.from_pretrained(folder)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert_same_modules(sd3 | {"text_encoder_3": None}, pipe)
    image = generate(pipe, negative_prompt="blurry")
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


# ---------------------------------------------------------------------------- single files


@pytest.mark.parametrize("kind", FLUX_KINDS)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_transformer_file_is_bfls_layout_and_round_trips(kind, prefix, flux, models_dir, no_network):
    path = save_flux_transformer_file(
        models_dir / f"flux-{kind}-{len(prefix)}.safetensors", guidance_embeds=FLUX_KINDS[kind], prefix=prefix
    )
    state = load_file(path)
    assert {prefix + "double_blocks.0.img_attn.qkv.weight", prefix + "single_blocks.0.linear1.weight"} <= set(state)
    assert all(k.startswith(prefix) for k in state)
    assert infer_diffusers_model_type(state) == f"flux-{kind}"  # guidance_in.* tells dev from schnell
    with tiny_flux_single_files():
        transformer = FluxTransformer2DModel.from_single_file(
            path, config=str(path.with_suffix("")), subfolder="transformer"
        )
    assert_same_tensors(flux[kind]["transformer"].state_dict(), transformer.state_dict())


def test_flux_transformer_file_with_an_encoder_folder_makes_the_pipeline(flux, models_dir, no_network):
    path = save_flux_transformer_file(models_dir / "schnell-alone.safetensors", guidance_embeds=False)
    with tiny_flux_single_files():
        transformer = FluxTransformer2DModel.from_single_file(
            path, config=str(path.with_suffix("")), subfolder="transformer"
        )
    folder = save_flux_folder(models_dir / "dev-encoders", guidance_embeds=True)  # dev and schnell share them
    pipe = FluxPipeline.from_pretrained(folder, transformer=transformer)
    assert_same_modules(flux["schnell"], pipe)
    assert generate(pipe).shape == (1, 64, 64, 3)


def test_flux_checkpoint_file_is_comfys_layout_and_loads_whole(flux, models_dir, no_network):
    path = save_flux_checkpoint_file(models_dir / "flux-dev-aio.safetensors")
    # ComfyUI's parts: the model, the VAE, and each text encoder under its own name
    parts = {".".join(k.split(".")[: 2 if k.startswith("text_encoders.") else 1]) for k in load_file(path)}
    assert parts == {"model", "vae", "text_encoders.clip_l", "text_encoders.t5xxl"}
    with tiny_flux_single_files():
        pipe = FluxPipeline.from_single_file(path, config=str(path.with_suffix("")))
    assert_same_modules(flux["dev"], tie_t5(pipe, "text_encoder_2"))
    assert np.isfinite(generate(pipe, guidance_scale=3.5)).all()


def test_flux_fp8_file_holds_linear_weights_in_fp8(flux, models_dir, no_network):
    path = save_flux_transformer_file(models_dir / "flux-dev-fp8.safetensors", dtype=torch.float8_e4m3fn)
    state = load_file(path)
    fp8 = {k for k, v in state.items() if v.dtype == torch.float8_e4m3fn}
    assert "double_blocks.0.img_attn.qkv.weight" in fp8 and "img_in.weight" in fp8
    assert not any(k.endswith((".bias", ".scale")) for k in fp8)
    with tiny_flux_single_files():
        transformer = FluxTransformer2DModel.from_single_file(
            path, config=str(path.with_suffix("")), subfolder="transformer"
        )
    assert_same_tensors(fp8_cast(flux["dev"]["transformer"]), transformer.state_dict())


def test_sd3_checkpoint_file_is_sais_layout_and_loads_whole(sd3, models_dir, no_network):
    path = save_sd3_checkpoint_file(models_dir / "sd35.safetensors")
    state = load_file(path)
    assert {
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
        "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        "text_encoders.clip_g.transformer.text_projection.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
    } <= set(state)
    pipe = StableDiffusion3Pipeline.from_single_file(path, config=str(path.with_suffix("")))
    assert_same_modules(sd3, tie_t5(pipe, "text_encoder_3"))
    assert np.isfinite(generate(pipe, negative_prompt="blurry")).all()


def test_sd3_checkpoint_file_without_t5(sd3, models_dir, no_network):
    path = save_sd3_checkpoint_file(models_dir / "sd35-no-t5.safetensors", with_t5=False)
    assert not any(k.startswith("text_encoders.t5xxl.") for k in load_file(path))
    pipe = StableDiffusion3Pipeline.from_single_file(
        path, config=str(path.with_suffix("")), text_encoder_3=None, tokenizer_3=None
    )
    assert_same_modules(sd3 | {"text_encoder_3": None}, pipe)


def test_sd3_file_without_encoders_and_in_fp8(sd3, models_dir, no_network):
    path = save_sd3_checkpoint_file(models_dir / "sd35-fp8.safetensors", dtype=torch.float8_e4m3fn, text_encoders=False)
    state = load_file(path)
    assert not any(k.startswith("text_encoders.") for k in state)
    assert state["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert state["model.diffusion_model.pos_embed"].dtype == torch.float32
    config = str(path.with_suffix(""))
    transformer = SD3Transformer2DModel.from_single_file(path, config=config, subfolder="transformer")
    assert_same_tensors(fp8_cast(sd3["transformer"]), transformer.state_dict())
    vae = AutoencoderKL.from_single_file(path, config=config, subfolder="vae")
    assert_same_tensors(sd3["vae"].state_dict(), vae.state_dict())


def test_sd35_medium_dual_attention_maps_back_through_diffusers_converter():
    # 3.5 Medium's MMDiT-X blocks add a second image attention (attn2); the tiny model above has
    # none, so the mapping of those keys is checked on a transformer that has.
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    state = sd3_to_sai(transformer)
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in state
    back = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in state.items()})
    assert_same_tensors(transformer.state_dict(), back)
