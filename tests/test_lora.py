"""``<lora:NAME:WEIGHT>``: a kohya-format LoRA file changes the tiny model's image, and nothing
of it stays behind for the next job; names only, clear messages; different sets share a batch."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from engine.config.settings import EngineSettings, GenerationSettings
from engine.errors import GenerationError
from engine.features.lora import lora_key, parse_lora_key, strip_lora_tags
from engine.types import GenerationRequest
from tolerance import assert_same_image


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from tinylora import save_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    save_tiny_lora(folder / "detail.safetensors", seed=1)
    save_tiny_lora(folder / "style v2.safetensors", seed=2, text_encoder=False)  # UNet only
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def lora_model(tiny_sd_folder, lora_dir):
    """Its own copy of the tiny SD1 model: adapters are added to it (the shared one stays clean)."""
    import torch

    from engine.families.loading import load_model

    model = load_model(str(tiny_sd_folder), device="cpu", dtype=torch.float32, name="tiny-sd1", progress=False)
    model.lora_dir = lora_dir
    return model


@pytest.fixture(scope="module")
def pipeline(lora_model):
    from engine.pipeline import Pipeline

    return Pipeline(lora_model)


def request(prompt: str, job_id: int = 1, **kw) -> GenerationRequest:
    return GenerationRequest.of(
        job_id=job_id, prompt=prompt, seed=7, steps=3, guidance=5.0, width=64, height=64, sampler="euler", **kw
    )


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].png)), dtype=np.int16)


def test_tags_are_parsed_and_left_out_of_the_text():
    assert strip_lora_tags("a cat <lora:detail:0.8>, sitting<LORA:x>") == "a cat , sitting"
    assert lora_key("<lora:b> x <lora:a:0.5>") == (("a", "0.5"), ("b", ""))
    assert [(u.name, u.weight) for u in parse_lora_key(lora_key("<lora:a:0.5><lora:a:0.25><lora:b>"))] == [
        ("a", 0.75),
        ("b", 1.0),
    ]


@pytest.mark.parametrize(
    "tag", ["<lora:../detail>", "<lora:sub/detail>", "<lora:..\\detail:1>", "<lora::1>", "<lora:/etc/passwd>"]
)
def test_paths_are_refused(tag):
    with pytest.raises(GenerationError, match="file name only"):
        parse_lora_key(lora_key(tag))


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("<lora:detail:lots>", "must be a number"),
        ("<lora:detail:0.5:1>", "must be a number"),
        ("<lora:detail:1e9>", "from -10 to 10"),
    ],
)
def test_bad_weights_are_refused(tag, message):
    with pytest.raises(GenerationError, match=message):
        parse_lora_key(lora_key(tag))


def test_the_adapters_hold_the_file_s_weights(pipeline, lora_model, lora_dir):
    """diffusers + peft can silently leave an unmatched adapter at random weights: compare."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(lora_dir / "detail.safetensors")
    pipeline.use_loras(request("<lora:detail:1>"))
    adapter = pipeline.loras._loaded["detail"][0]
    unet_q = lora_model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    text_v = lora_model.text_encoders[0].encoder.layers[1].self_attn.v_proj
    for layer, key in (
        (unet_q, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"),
        (text_v, "lora_te_text_model_encoder_layers_1_self_attn_v_proj"),
    ):
        assert torch.equal(layer.lora_A[adapter].weight, tensors[f"{key}.lora_down.weight"])
        assert torch.equal(layer.lora_B[adapter].weight, tensors[f"{key}.lora_up.weight"])
        assert layer.scaling[adapter] == 1.0  # alpha / rank, times the weight 1
    pipeline.use_loras(request("no lora"))


def test_a_lora_changes_the_image_and_leaves_nothing_behind(pipeline):
    plain = pixels(pipeline.generate(request("a red fox")))
    with_lora = pixels(pipeline.generate(request("a red fox <lora:detail:1>")))
    assert np.abs(plain - with_lora).mean() > 1.0
    # Weight 0 is the model itself; a smaller weight changes less.
    assert np.array_equal(pixels(pipeline.generate(request("a red fox <lora:detail:0>"))), plain)
    half = pixels(pipeline.generate(request("a red fox <lora:detail:0.5>")))
    assert 0 < np.abs(plain - half).mean() < np.abs(plain - with_lora).mean() * 1.5
    # The same prompt without the tag after LoRA jobs: adapters off, no cached LoRA encodings.
    assert np.array_equal(pixels(pipeline.generate(request("a red fox"))), plain)
    # A UNet-only LoRA whose name has a space, and two LoRAs together.
    style = pixels(pipeline.generate(request("a red fox <lora:style v2:1>")))
    both = pixels(pipeline.generate(request("a red fox <lora:style v2:1> <lora:detail:1>")))
    assert not np.array_equal(style, plain) and not np.array_equal(both, style)
    assert np.array_equal(pixels(pipeline.generate(request("a red fox"))), plain)


def test_the_infotext_keeps_the_tag_as_written(pipeline):
    result = pipeline.generate(request("a red fox <lora:detail:0.7>"))
    assert result.infotext.startswith("a red fox <lora:detail:0.7>\n")


def test_an_unknown_lora_names_the_available_ones(pipeline):
    with pytest.raises(GenerationError, match=r"No LoRA named 'nope'; available: detail, style v2\."):
        pipeline.generate(request("a red fox <lora:nope:1>"))


def test_a_model_without_a_lora_folder_says_so(tiny_model):
    from engine.pipeline import Pipeline

    with pytest.raises(GenerationError, match="No LoRA named 'detail'; available: none .*no LoRA folder"):
        Pipeline(tiny_model).generate(request("a red fox <lora:detail>"))


def test_jobs_with_different_lora_sets_share_a_batch(lora_model, pipeline, lora_dir):
    """Submitted together, the jobs share every step (each row adds its own LoRAs:
    engine/features/lora_slots.py, tests/test_lora_rows.py) and each comes out as it does alone."""
    from engine.serving.worker import EngineWorker
    from tinylora import save_tiny_lora

    save_tiny_lora(lora_dir / "soft.safetensors", seed=3, scale=0.3)  # the tiny UNet stays out of chaos
    prompts = ["a red fox", "a red fox <lora:soft:1>", "a red fox", "a red fox <lora:soft:0.5> <lora:style v2:0.2>"]
    alone = [pixels(pipeline.generate(request(p, job_id=i))) for i, p in enumerate(prompts)]
    worker = EngineWorker(lora_model, EngineSettings(max_batch=8), GenerationSettings(max_width=256, max_height=256))
    batches: list[set] = []
    step = worker._step

    def watch(batch):  # which LoRA sets share each step
        batches.append({lora_key(e.job.request.params.prompt) for e in batch.entries})
        step(batch)

    worker._step = watch

    async def all_together():
        return await asyncio.gather(*(worker.generate(request(p, job_id=i)) for i, p in enumerate(prompts)))

    worker.start()
    try:
        results = asyncio.run(all_together())
    finally:
        worker.stop()
    for got, expected in zip(results, alone, strict=False):
        assert_same_image(pixels(got), expected)
    assert max(len(sets) for sets in batches) == 3
