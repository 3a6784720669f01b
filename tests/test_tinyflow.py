"""tests/tinyflow.py: the tiny Flux.1 and SD 3.5 models load with diffusers' own pipelines, offline,
in every format written, to the very tensors that were built."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from tinyflow import (
    build_flux_components,
    build_sd3_components,
    save_flux_folder,
    save_sd3_folder,
    t5_tokenizer,
)

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
def flux(request):
    """kind -> the components as built (seed 0), once per module."""
    return {kind: build_flux_components(guidance) for kind, guidance in FLUX_KINDS.items()}


@pytest.fixture(scope="module")
def sd3():
    return build_sd3_components(with_t5=True)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tinyflow")


def assert_same_modules(expected: dict, loaded) -> None:
    """Every weight of every model component equal, key for key."""
    for name in MODULES:
        want = expected.get(name)
        got = getattr(loaded, name, None)
        if want is None:
            assert got is None, name
            continue
        want, got = want.state_dict(), got.state_dict()
        assert set(got) == set(want), name
        assert [k for k in want if not torch.equal(want[k], got[k])] == [], name


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
