"""Issue 11 §4: the VAE stays in the model's precision, only the images it gets wrong are decoded
again in float32, the decode chunk is a setting, and a VAE that gets every image wrong is given up
for float32 instead of decoding each image twice."""

from __future__ import annotations

import pytest
import torch

import engine.vae
from engine.config.settings import ConfigError, EngineSettings, GenerationSettings, parse_engine_sections
from engine.families.loading import load_model
from engine.pipeline import Pipeline
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest


def make_request(job_id: int, **fields) -> GenerationRequest:
    defaults = dict(prompt=f"prompt {job_id}", seed=100 + job_id, steps=3, width=64, height=64, sampler="euler")
    return GenerationRequest.of(job_id=job_id, **(defaults | fields))


@pytest.fixture
def bf16_pipeline(tiny_sd_folder):
    """A bfloat16 tiny model whose decoder, in low precision, turns the rows in ``fault["rows"]``
    to NaN; ``fault["calls"]`` records each decoder call's dtype and row count."""
    model = load_model(str(tiny_sd_folder), device="cpu", dtype=torch.bfloat16, name="tiny-bf16", progress=False)
    fault = {"rows": set(), "calls": []}

    def overflow(module, inputs, output):
        fault["calls"].append((output.dtype, output.shape[0]))
        if output.dtype != torch.float32 and fault["rows"]:
            output = output.clone()
            output[sorted(fault["rows"] & set(range(output.shape[0])))] = float("nan")
        return output

    model.vae.decoder.register_forward_hook(overflow)
    pipeline = Pipeline(model)
    pipeline.fault = fault
    return pipeline


def test_a_float16_model_keeps_its_vae_in_float16(tiny_sd_folder):
    model = load_model(str(tiny_sd_folder), device="cpu", dtype=torch.float16, name="tiny-fp16", progress=False)
    assert model.vae.config.force_upcast  # diffusers would decode it in float32 every time
    assert Pipeline(model).model.vae.dtype == torch.float16


def test_only_the_bad_images_of_a_chunk_are_decoded_again_in_float32(bf16_pipeline):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, plain_invalid = bf16_pipeline.decode_pixels(latents, 4)
    bf16_pipeline.fault["rows"], bf16_pipeline.fault["calls"] = {1}, []
    pixels, invalid = bf16_pipeline.decode_pixels(latents, 4)
    assert bf16_pipeline.fault["calls"] == [(torch.bfloat16, 3), (torch.float32, 1)]  # row 1 alone, again
    assert not invalid.any() and not plain_invalid.any()
    assert torch.equal(pixels[[0, 2]], plain[[0, 2]])  # the good ones kept their low-precision pixels
    assert (pixels[1] - plain[1]).abs().max() < 0.1  # the same image, at a higher precision


def test_a_vae_wrong_on_every_image_is_given_up_for_float32(bf16_pipeline, caplog):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    bf16_pipeline.fault["rows"] = {0, 1}
    for _ in range(engine.vae.GIVE_UP_AFTER):
        assert not bf16_pipeline.decode_pixels(latents, 4)[1].any()
    assert "float32 from now on" in caplog.text
    bf16_pipeline.fault["calls"] = []
    assert not bf16_pipeline.decode_pixels(latents, 4)[1].any()
    assert bf16_pipeline.fault["calls"] == [(torch.float32, 2)]  # once, in float32


def test_a_good_decode_ends_the_streak(bf16_pipeline):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for rows in ({0, 1}, set(), {0, 1}, {0, 1}):
        bf16_pipeline.fault["rows"] = rows
        bf16_pipeline.decode_pixels(latents, 4)
    bf16_pipeline.fault["calls"] = []
    bf16_pipeline.decode_pixels(latents, 4)
    assert bf16_pipeline.fault["calls"][0] == (torch.bfloat16, 2)  # two in a row so far: still tried


def test_the_worker_decodes_engine_decode_chunk_images_at_a_time(bf16_pipeline):
    worker = EngineWorker(bf16_pipeline.model, EngineSettings(preview_every=0, decode_chunk=2), GenerationSettings())
    worker.start()
    try:
        bf16_pipeline.fault["calls"] = []
        assert len(worker.generate_blocking(make_request(1, count=3)).images) == 3
    finally:
        worker.stop()
    assert bf16_pipeline.fault["calls"] == [(torch.bfloat16, 2), (torch.bfloat16, 1)]


def test_engine_decode_chunk_is_checked():
    with pytest.raises(ConfigError, match="engine.decode_chunk"):
        parse_engine_sections({"model": {"source": "m.safetensors"}, "engine": {"decode_chunk": 0}})
