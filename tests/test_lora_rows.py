"""Jobs with different LoRA sets share one batch (issue 23): each row adds its own LoRAs from the
slot buffers (engine/features/lora_slots.py), and a job comes out as it does alone with its set
applied to the whole network through peft (the path before the slots, kept for sets that cannot
run per row): weights 0.5 and 1.2, two LoRAs in one job, one LoRA at two weights, a LoCon
(convolution) LoRA, SDXL, Flux.1 and SD 3.5 rows; the slots keep their addresses across loads and a slot
a job uses is never taken; a LoRA over the maximum rank runs whole, in a batch of its own; the
batch's step compiles whole with LoRA rows mixed in, and the compiled graphs pad them to buckets.

The tiny LoRAs here are gentler (scale 0.3) than tests/test_lora.py's: at 0.5 the tiny UNet is so
far from its training-free equilibrium that float32 rounding of a batch's matrix kernels grows
past the suite's tolerance (float64 agrees exactly; measured when this file was written).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.batching.batch import Batch
from engine.families.loading import load_model
from engine.features.lora import LoraLibrary
from engine.features.lora_slots import SlotsBusy
from engine.pipeline import Pipeline, to_images
from engine.prompt_syntax import lora_key
from engine.types import GenerationRequest
from tolerance import LATENT_TOLERANCE
from tolerance import assert_same_image as assert_same_pixels

SCALE = 0.3
SLOTS = 5


def locon(components: dict, seed: int) -> dict[str, torch.Tensor]:
    """kohya's LoCon: the attention pairs plus the resnets' 3x3 convolutions (up weights 1x1)."""
    from tinylora import kohya_lora

    state = kohya_lora(components, seed=seed, scale=SCALE)
    generator = torch.Generator().manual_seed(seed + 100)
    for name, conv in components["unet"].named_modules():
        if isinstance(conv, torch.nn.Conv2d) and ".resnets." in name and name.endswith(("conv1", "conv2")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, conv.in_channels, 3, 3, generator=generator) * 0.1
            state[f"{key}.lora_up.weight"] = torch.randn(conv.out_channels, 4, 1, 1, generator=generator) * 0.1
            state[f"{key}.alpha"] = torch.tensor(4.0)
    return state


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    from tinylora import save_tiny_lora
    from tinymodel import build_tiny_components

    folder = tmp_path_factory.mktemp("row-loras")
    for name, seed in (("a", 11), ("b", 12), ("c", 13), ("d", 14), ("e", 15), ("f", 18)):
        save_tiny_lora(folder / f"{name}.safetensors", seed=seed, scale=SCALE)
    save_tiny_lora(folder / "wide.safetensors", seed=16, scale=SCALE / 2, rank=8)  # over the rank of 4
    save_file(locon(build_tiny_components("sd1"), 17), folder / "conv.safetensors")
    return folder


def sd_pipeline(folder: Path, lora_dir: Path, slots: int) -> Pipeline:
    """A copy of the tiny SD1 model of its own (adapters and slots are added to it); ``slots`` 0:
    every set through peft on the whole UNet, the reference."""
    model = load_model(str(folder), device="cpu", dtype=torch.float32, name=f"tiny-sd1-{slots}", progress=False)
    model.lora_dir, model.lora_slots, model.lora_max_rank = lora_dir, slots, 4
    return Pipeline(model)


@pytest.fixture(scope="module")
def rows(tiny_sd_folder, lora_dir) -> Pipeline:
    return sd_pipeline(tiny_sd_folder, lora_dir, slots=SLOTS)


@pytest.fixture(scope="module")
def whole(tiny_sd_folder, lora_dir) -> Pipeline:
    return sd_pipeline(tiny_sd_folder, lora_dir, slots=0)


def request(prompt: str, job_id: int, family: str = "sd1", **kw) -> GenerationRequest:
    guidance = {"sd1": 5.0, "flux": 3.5, "sd3": 4.0}[family]
    return GenerationRequest.of(
        job_id=job_id, prompt=prompt, seed=7 + job_id, steps=3, guidance=guidance, width=64, height=64,
        sampler="euler", **kw,
    )  # fmt: skip


def assert_same_image(pipeline: Pipeline, got: torch.Tensor, expected: torch.Tensor) -> None:
    """The suite's tolerance on the images (tests/tolerance.py); the latents within float32's
    rounding at their size (|latents| up to ~40 on the tiny models: 1e-5 relative of that)."""
    torch.testing.assert_close(got, expected, atol=LATENT_TOLERANCE * 5, rtol=LATENT_TOLERANCE)
    assert_same_pixels(*(to_images(*pipeline.decode_pixels(latents))[0] for latents in (got, expected)))


def run(pipeline: Pipeline, prompts: list[str], family: str = "sd1") -> list[torch.Tensor]:
    """The prompts' jobs in one batch, their latents in order."""
    batch, out = Batch(pipeline.denoiser), {}
    for i, prompt in enumerate(prompts):
        batch.add(pipeline.prepare(request(prompt, i, family)))
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            out[entry.job.request.job_id] = batch.remove(entry.job)
    return [out[i] for i in range(len(prompts))]


def alone(pipeline: Pipeline, prompts: list[str], family: str = "sd1") -> list[torch.Tensor]:
    """Each job in a batch of its own (job ids as in :func:`run`, so the same seeds)."""
    out = []
    for i, prompt in enumerate(prompts):
        batch = Batch(pipeline.denoiser)
        job = pipeline.prepare(request(prompt, i, family))
        batch.add(job)
        while not batch.entries[0].done:
            batch.step()
        out.append(batch.remove(job))
    return out


MIXED = [
    "a red fox <lora:a:1.2>",
    "a red fox <lora:a:0.5>",  # the same LoRA at another weight in another row
    "a red fox <lora:b>",
    "a cat <lora:c:0.7> <lora:d:1>",  # two LoRAs in one job
    "a red fox",  # none
    "a red fox <lora:conv:0.8>",  # LoCon: the resnets' convolutions too
]


def test_every_job_is_its_set_alone_through_peft(rows, whole):
    batched = run(rows, MIXED)
    reference = alone(whole, MIXED)
    for got, expected in zip(batched, reference, strict=True):
        assert_same_image(rows, got, expected)
    # One batch for all: the sets are in slots, and nothing ran on the whole network.
    assert rows.loras.whole_jobs == 0 and set(rows.loras.slots.slot_of) >= {"a", "b", "c", "d"}
    assert any(layer.conv for layer in rows.loras.slots.layers.values())
    # Each LoRA matters, so a mix-up could not pass: the plain job's latents are far from the others'.
    plain = batched[4]
    for i in (0, 1, 2, 3, 5):
        assert (batched[i] - plain).abs().mean() > 0.01
    assert (batched[0] - batched[1]).abs().mean() > 0.01


def test_sdxl_rows_are_their_set_alone(tiny_sdxl_single_file, tmp_path):
    """SDXL's UNet (added embeddings, two CLIPs): kohya LoRAs on the UNet and both CLIPs."""
    from tinylora import kohya_lora
    from tinymodel import build_tiny_components

    components = build_tiny_components("sdxl")
    for name, seed in (("x", 31), ("y", 32)):
        state = kohya_lora(components, seed=seed, scale=SCALE, text_encoder=False)
        save_file(state, tmp_path / f"{name}.safetensors")
    pipelines = []
    for slots in (SLOTS, 0):
        model = load_model(str(tiny_sdxl_single_file), device="cpu", dtype=torch.float32, progress=False)
        model.lora_dir, model.lora_slots = tmp_path, slots
        pipelines.append(Pipeline(model))
    prompts = ["a red fox <lora:x:1.2>", "a red fox", "a cat <lora:y:0.5> <lora:x>"]
    batched = run(pipelines[0], prompts)
    for got, expected in zip(batched, alone(pipelines[1], prompts), strict=True):
        assert_same_image(pipelines[0], got, expected)
    assert (batched[0] - batched[1]).abs().mean() > 0.01 and pipelines[0].loras.whole_jobs == 0


def test_slots_keep_their_addresses_and_a_used_slot_is_never_taken(rows, lora_dir):
    slots = rows.loras.slots
    run(rows, ["x <lora:a>", "x <lora:b>", "x <lora:c>", "x <lora:d>", "x <lora:conv>"])  # every slot filled
    addresses = {name: (layer.down.data_ptr(), layer.up.data_ptr()) for name, layer in slots.layers.items()}
    held = rows.prepare(request("x <lora:a> <lora:b>", 1))  # a live job keeps a and b in their slots
    kept = {slots.slot_of["a"], slots.slot_of["b"]}
    before = {s: slots.layers[next(iter(slots.layers))].down[s].clone() for s in kept}
    rows.prepare(request("x <lora:e>", 2))  # into the least recently used slot no job uses
    assert slots.slot_of["e"] not in kept
    assert addresses == {name: (layer.down.data_ptr(), layer.up.data_ptr()) for name, layer in slots.layers.items()}
    first = next(iter(slots.layers))
    for s in kept:
        assert torch.equal(slots.layers[first].down[s], before[s])
    # The new slot holds e's weights (alpha / rank = 1), padded to the rank with zeros.
    file = load_file(lora_dir / "e.safetensors")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    key = "lora_unet_" + q.replace(".", "_")
    layer, slot = slots.layers[q], slots.slot_of["e"]
    assert torch.equal(layer.down[slot], file[f"{key}.lora_down.weight"])
    assert torch.equal(layer.up[slot], file[f"{key}.lora_up.weight"].t())
    # With jobs holding every slot, a sixth LoRA waits.
    jobs = [held, rows.prepare(request("x <lora:e> <lora:c>", 3)), rows.prepare(request("x <lora:conv>", 4))]
    with pytest.raises(SlotsBusy):
        rows.prepare(request("x <lora:f>", 5))
    del jobs, held
    rows.prepare(request("x <lora:f>", 5))  # once they are gone, it loads


def test_a_lora_over_the_maximum_rank_runs_whole_in_a_batch_of_its_own(rows, whole):
    from engine.serving.worker import EngineWorker

    library: LoraLibrary = rows.loras
    wide = lora_key("x <lora:wide>")
    assert "rank 8" in library.runs_whole(wide) and library.batch_part(wide) == wide
    assert library.batch_part(lora_key("<lora:a>")) is None and library.batch_part(lora_key("x")) is None
    before = library.whole_jobs
    (latents,) = alone(rows, ["a red fox <lora:wide>"])
    assert library.whole_jobs == before + 1 and library.whole
    assert_same_image(rows, latents, alone(whole, ["a red fox <lora:wide>"])[0])
    # The worker's key: per-row sets share one, the wide one has its own.
    from engine.config.settings import EngineSettings, GenerationSettings

    worker = EngineWorker(rows.model, EngineSettings(), GenerationSettings())
    worker.pipeline = rows
    keys = {worker._key(request(p, 1)) for p in ("x <lora:a>", "x <lora:b:0.3>", "x")}
    assert len(keys) == 1 and worker._key(request("x <lora:wide>", 1)) not in keys


def test_the_step_compiles_whole_with_lora_rows_mixed_in(rows):
    """``Batch.arithmetic`` under ``torch.compile(fullgraph=True)`` (tests/test_compile.py)."""
    torch._dynamo.reset()
    batch = Batch(rows.denoiser)
    for i, prompt in enumerate(["a <lora:a:1.2>", "b", "c <lora:c:0.7> <lora:d>", "d <lora:conv>"]):
        batch.add(rows.prepare(request(prompt, i)))
    arguments = (batch.x, batch.by_column(), None, batch.x, batch.by_column()[0], batch.state)
    compiled = torch.compile(batch.arithmetic, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        x_next, denoised, _ = compiled(*arguments)
        expected = batch.arithmetic(*arguments)
    torch.testing.assert_close(x_next, expected[0])
    torch.testing.assert_close(denoised, expected[1])


def test_compiled_graphs_pad_the_lora_rows_to_their_bucket(tiny_sd_folder, lora_dir, whole):
    """Five jobs (ten UNet rows) run in the graph of bucket 8 with their slots padded like their prompts."""
    torch._dynamo.reset()
    pipeline = sd_pipeline(tiny_sd_folder, lora_dir, slots=SLOTS)
    pipeline.denoiser.compile(functools.partial(torch.compile, backend="eager", fullgraph=True, dynamic=False))
    prompts = MIXED[:5]
    for got, expected in zip(run(pipeline, prompts), alone(whole, prompts), strict=True):
        assert_same_image(pipeline, got, expected)
    # Every call in a graph, one of them with two LoRAs a row (the key's LoRA width).
    assert pipeline.denoiser.eager_calls == 0 and any(key[4] == 2 for key in pipeline.denoiser.graphs)


def test_through_the_worker_a_job_waits_for_a_slot_and_a_wide_lora_for_its_own_batch(tiny_sd_folder, lora_dir, whole):
    """One slot: jobs of two LoRAs take turns in it (the second waits, none is lost or mixed up);
    a LoRA over the rank runs in a batch of its own; each job is its set alone."""
    import asyncio

    from engine.config.settings import EngineSettings, GenerationSettings
    from engine.serving.worker import EngineWorker

    pipeline = sd_pipeline(tiny_sd_folder, lora_dir, slots=1)
    prompts = ["a red fox <lora:a>", "a red fox <lora:b:0.5>", "a red fox", "a red fox <lora:wide>", "a fox <lora:a>"]
    worker = EngineWorker(
        pipeline.model, EngineSettings(max_batch=8), GenerationSettings(max_width=256, max_height=256)
    )
    worker.pipeline = worker.models._pipelines[worker.model_name] = pipeline
    batches: list[set] = []
    step = worker._step

    def watch(batch):  # which LoRA sets share each step
        batches.append({lora_key(e.job.request.params.prompt) for e in batch.entries})
        step(batch)

    worker._step = watch

    async def all_together():
        return await asyncio.gather(*(worker.generate(request(p, i)) for i, p in enumerate(prompts)))

    worker.start()
    try:
        results = asyncio.run(all_together())
    finally:
        worker.stop()
    expected = alone(whole, prompts)
    for result, reference in zip(results, expected, strict=True):
        assert_same_pixels(result.images[0].png, to_images(*whole.decode_pixels(reference))[0])
    wide = lora_key("x <lora:wide>")
    assert all(sets == {wide} for sets in batches if wide in sets)  # alone
    assert not any({lora_key("<lora:a>"), lora_key("<lora:b:0.5>")} <= sets for sets in batches)  # one slot
    assert pipeline.loras.whole_jobs >= 1


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_transformer_rows_are_their_set_alone(tmp_path_factory, family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from test_families_lora import diffusers_lora, kohya_flux_lora
    from tinyflow import save_flux_folder, save_sd3_folder

    root = tmp_path_factory.mktemp(f"{family}-rows")
    folder = (save_flux_folder if family == "flux" else save_sd3_folder)(root / family)
    loras = root / "loras"
    loras.mkdir()
    if family == "flux":
        pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
        save_file(diffusers_lora({"transformer": pipe.transformer}, 21), loras / "one.safetensors")
        save_file(kohya_flux_lora(pipe.transformer, pipe.text_encoder, 22), loras / "two.safetensors")
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
        modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
        save_file(diffusers_lora(modules, 21), loras / "one.safetensors")
        save_file(diffusers_lora({"transformer": pipe.transformer}, 22), loras / "two.safetensors")
    del pipe
    pipelines = []
    for slots in (4, 0):
        model = load_model(str(folder), device="cpu", dtype=torch.float32, name=f"{family}-{slots}", progress=False)
        model.lora_dir, model.lora_slots = loras, slots
        pipelines.append(Pipeline(model))
    prompts = ["a red cat <lora:one:0.5>", "a red cat", "a red cat <lora:two:1.2>", "a cat <lora:one> <lora:two:0.5>"]
    batched = run(pipelines[0], prompts, family)
    for got, expected in zip(batched, alone(pipelines[1], prompts, family), strict=True):
        assert_same_image(pipelines[0], got, expected)
    assert (batched[0] - batched[1]).abs().mean() > 1e-3 and pipelines[0].loras.whole_jobs == 0
