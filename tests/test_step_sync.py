"""Issue 11 §1 and §5, counted: a steady step makes no host-device sync with previews on, and
launches no more kernels outside the UNet than diffusers' pipeline (bench/step_cost.py's counts);
the noise drawn at admission is the noise of drawing it step by step, for every sampler that draws."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine.pipeline import Pipeline
from engine.sampling.samplers import SAMPLERS
from engine.sampling.sde import brownian_noises
from engine.types import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

DRAWING = [name for name, sampler in SAMPLERS.items() if sampler.ancestral or sampler.brownian]


@pytest.mark.parametrize("name", DRAWING)
def test_noise_drawn_at_admission_is_the_noise_drawn_step_by_step(tiny_model, name):
    request = GenerationRequest.of(
        job_id=1, prompt="a fox", seed=7, steps=5, width=64, height=64, sampler=name, count=2, guidance=5.0
    )
    job = Pipeline(tiny_model).prepare(request)
    shape = tuple(job.latents.shape[1:])
    generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
    for g in generators:
        torch.randn(shape, generator=g)  # each image's first draw is its initial noise
    trees = brownian_noises(job.seeds, shape, job.sigmas)
    assert job.noise.shape == (job.engine_steps, job.rows, *shape)
    for k, interval in enumerate(job.plan.noise):
        if interval is None:
            expected = torch.zeros(job.rows, *shape)
        elif job.sampler.brownian:
            expected = torch.stack([tree(*interval) for tree in trees])
        else:
            expected = torch.stack([torch.randn(shape, generator=g) for g in generators])
        assert torch.equal(job.noise[k].cpu(), expected), f"engine step {k}"


def test_a_steady_step_makes_no_sync_and_no_more_kernels_outside_the_unet_than_diffusers():
    import step_cost

    torch.manual_seed(0)
    components = step_cost.build_components("tiny")
    model = step_cost.loaded_model(components, "tiny", torch.device("cpu"), torch.float32)
    undo = step_cost.patch_sync_points()
    try:
        ours = step_cost.report("our engine", step_cost.count_engine(model))
        theirs = step_cost.report("diffusers", step_cost.count_diffusers(components))
    finally:
        undo()
    assert ours["syncs, stepping thread"] == 0, "the engine thread waited for the device"
    assert ours["syncs, other threads"] == 0, "the preview pool waited for the device"
    assert ours["uploads (non-blocking)"] == 0  # the noise was uploaded at admission
    assert ours["downloads (non-blocking)"] > 0  # previews and the NaN check did reach the host
    assert ours["kernels outside the UNet"] <= theirs["kernels outside the UNet"]


def test_lora_rows_add_no_sync_and_no_kernel_outside_the_unet(tmp_path):
    """Issue 23: with LoRA rows mixed in (one LoRA, another at 0.5, two, none), a steady step still
    makes no sync, and the rows' LoRAs run inside the UNet (their slots and weights are made per job)."""
    import step_cost

    torch.manual_seed(0)
    components = step_cost.build_components("tiny")
    model = step_cost.loaded_model(components, "tiny", torch.device("cpu"), torch.float32)
    undo = step_cost.patch_sync_points()
    try:
        plain = step_cost.report("our engine", step_cost.count_engine(model))
        rows = step_cost.report(
            "LoRA rows", step_cost.count_engine(step_cost.with_loras(components, model, tmp_path), True)
        )
    finally:
        undo()
    assert rows["syncs, stepping thread"] == 0 and rows["syncs, other threads"] == 0
    assert rows["uploads (non-blocking)"] == 0
    assert rows["kernels outside the UNet"] == plain["kernels outside the UNet"]
    assert rows["UNet kernels"] > plain["UNet kernels"]  # the LoRAs did run, inside the UNet
