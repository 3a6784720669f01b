"""The flow families' transformers in compiled graphs (``engine.compile``, issue 21 point 7): the
same latents compiled as eager in a batch of mixed jobs, and the whole step traced with no graph
break for every row bucket. Compiled with dynamo's eager backend: the tracing, bucketing and
buffers are ours to test here; inductor and CUDA graphs are the GPU script's."""

from __future__ import annotations

import functools

import pytest
import torch

from engine.batching.batch import Batch
from engine.batching.graphs import BUCKETS
from engine.families.loading import load_model
from engine.pipeline import Pipeline
from engine.types import GenerationRequest
from tinyflow import save_flux_folder, save_sd3_folder

EAGER_BACKEND = functools.partial(torch.compile, backend="eager", dynamic=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow-compile")
    return {"flux": save_flux_folder(root / "flux"), "sd3": save_sd3_folder(root / "sd3")}


def pipeline_of(folders, family: str) -> Pipeline:
    return Pipeline(load_model(str(folders[family]), device="cpu", dtype=torch.float32, progress=False))


def request(job_id: int, **fields) -> GenerationRequest:
    base = dict(prompt=f"a red cat {job_id}", seed=20 + job_id, steps=3, width=64, height=64, sampler="euler")
    return GenerationRequest.of(job_id, **(base | fields))


JOBS = [
    request(1, count=3, guidance=3.5),
    request(2, steps=4, guidance=1.5, sampler="dpmpp_2m"),
    request(3, count=2, guidance=5.0, sampler="heun"),
]


def run(pipeline: Pipeline) -> list[torch.Tensor]:
    batch, jobs = Batch(pipeline.denoiser), [pipeline.prepare(r) for r in JOBS]
    for job in jobs:
        batch.add(job)
    finished = {}
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            finished[id(entry.job)] = batch.remove(entry.job)
    return [finished[id(job)] for job in jobs]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_compiled_transformer_gives_the_latents_it_gives_eager(folders, family):
    torch._dynamo.reset()
    eager = run(pipeline_of(folders, family))
    pipeline = pipeline_of(folders, family)
    pipeline.denoiser.compile(EAGER_BACKEND, 24)
    compiled = run(pipeline)
    graphs = pipeline.denoiser.graphs
    assert {key[0] for key in graphs} >= {8} and all(key[0] in BUCKETS for key in graphs)  # 6 rows as 8
    assert pipeline.denoiser.eager_calls == 0 and pipeline.denoiser.sampler_graphs.graphs
    for ours, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(ours, expected, atol=5e-5, rtol=0)  # padded rows: other matmul blocking


def step_compiles_whole(pipeline: Pipeline, rows: int) -> None:
    """``Batch.arithmetic`` (the denoiser, the samplers' step) under ``fullgraph=True``."""
    batch = Batch(pipeline.denoiser)
    batch.add(pipeline.prepare(request(1, count=rows)))
    arguments = (batch.x, batch.by_column(), None, batch.x, batch.by_column()[0], batch.state)
    compiled = torch.compile(batch.arithmetic, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        x_next, denoised, _ = compiled(*arguments)
        expected = batch.arithmetic(*arguments)
    torch.testing.assert_close(x_next, expected[0])
    torch.testing.assert_close(denoised, expected[1])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_flow_step_compiles_with_no_graph_break_for_every_bucket(folders, family):
    pipeline = pipeline_of(folders, family)
    for rows in BUCKETS:
        torch._dynamo.reset()
        step_compiles_whole(pipeline, rows)


def test_a_transformer_stored_in_fp8_runs_eager_when_compile_is_asked(folders, caplog):
    """diffusers' layerwise casting rebuilds each layer's parameters around its call, which dynamo
    cannot trace: such a model is not compiled, and the log says so once."""
    import logging

    model = load_model(str(folders["flux"]), device="cpu", dtype=torch.float32, progress=False, weights="float8_e4m3fn")
    pipeline = Pipeline(model)
    with caplog.at_level(logging.WARNING):
        pipeline.denoiser.compile(EAGER_BACKEND, 24)
    assert not pipeline.denoiser.compiled and "stored in float8" in caplog.text
    assert all(torch.isfinite(latents).all() for latents in run(pipeline))
