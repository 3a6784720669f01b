"""Issue 11 §3: the compiled UNet pads rows to buckets of 1, 2, 4, 8, 12, 16, 24, 32; the graphs
are a bounded, logged set (past the bound a shape runs eager, counted and logged); they can be
made at start; jobs in a graph give the pixels they give eager; and the step compiles whole,
with no graph break, for each bucket. On the CPU with dynamo's "eager" backend: the same tracing
and guards as on a GPU, with nothing built."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import pytest
import torch

from engine.batching.batch import Batch
from engine.batching.graphs import BUCKETS, bucket_rows, graph_counts
from engine.config.settings import ConfigError, EngineSettings, GenerationSettings, parse_engine_sections
from engine.pipeline import Pipeline
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest
from tolerance import assert_same_image

EAGER_BACKEND = functools.partial(torch.compile, backend="eager", dynamic=False)
BUDGET = 300


def make_request(job_id: int, **fields) -> GenerationRequest:
    defaults = dict(prompt=f"prompt {job_id}", seed=50 + job_id, steps=3, width=64, height=64, sampler="euler_a")
    return GenerationRequest.of(job_id=job_id, **(defaults | fields))


def run_together(worker: EngineWorker, requests):
    async def run():
        tasks = [asyncio.ensure_future(worker.generate(r)) for r in requests]
        await asyncio.sleep(0)  # all waiting before the thread starts: one batch
        worker.start()
        async with asyncio.timeout(BUDGET):
            return await asyncio.gather(*tasks)

    try:
        return asyncio.run(run())
    finally:
        worker.stop()


def test_rows_pad_to_the_next_bucket_and_waste_at_most_a_third_from_eight_rows():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 9, 13, 17, 25, 32, 33, 49)] == [1, 2, 4, 8, 12, 16, 24, 32, 32, 48, 64]
    assert all((bucket_rows(n) - n) / bucket_rows(n) <= 1 / 3 for n in range(8, 257))


def test_jobs_in_a_compiled_step_give_the_pixels_they_give_eager(tiny_model):
    requests = [make_request(1, count=3), make_request(2, sampler="dpmpp_2m", steps=4), make_request(3, count=2)]
    compiled = EngineWorker(
        tiny_model, EngineSettings(preview_every=0, compile="default"), GenerationSettings(), compiler=EAGER_BACKEND
    )
    results = run_together(compiled, requests)
    denoiser = compiled.pipeline.denoiser
    assert {key[0] for key in denoiser.graphs} >= {8}  # 6 rows ran padded to 8
    assert all(key[0] in BUCKETS for key in denoiser.graphs) and denoiser.eager_calls == 0
    eager = run_together(EngineWorker(tiny_model, EngineSettings(preview_every=0), GenerationSettings()), requests)
    for result, expected in zip(results, eager, strict=True):
        for image, reference in zip(result.images, expected.images, strict=True):
            assert_same_image(image.png, reference.png)


def test_each_graph_reads_its_own_buffers_and_the_prompts_are_written_only_when_members_change(tiny_model):
    """Static inputs: every call of one graph gets the same tensors (a CUDA graph replays on them
    without copying), and the conditioning is written into them at joins and leaves only."""
    calls: list[tuple[tuple, Any, Any]] = []  # (sample shape, sample, prompt embeddings): held, never freed

    def recording(unet):
        if not isinstance(unet, torch.nn.Module):
            return unet  # the samplers' step: its buffers, eager (its graphs: tests/test_sampler_graphs.py)
        compiled = EAGER_BACKEND(unet)

        def run(**inputs):
            sample, embeds = inputs["sample"], inputs["encoder_hidden_states"]
            calls.append((tuple(sample.shape), sample, embeds))
            return compiled(**inputs)

        return run

    worker = EngineWorker(
        tiny_model, EngineSettings(preview_every=0, compile="default"), GenerationSettings(), compiler=recording
    )
    # 5 rows (bucket 8) for 3 steps, then the second job's 2 rows (bucket 2) for 2 more.
    results = run_together(worker, [make_request(1, count=3, steps=3), make_request(2, count=2, steps=5)])
    graphs = worker.pipeline.denoiser.unet_graphs
    assert [shape[0] for shape, _, _ in calls] == [16, 16, 16, 4, 4]  # 2 x bucket rows (prompt, negative)
    for shape in {shape for shape, _, _ in calls}:
        addresses = {(s.data_ptr(), e.data_ptr()) for sh, s, e in calls if sh == shape}
        assert len(addresses) == 1, f"{shape}: new input tensors for each call"
    assert graphs.conditioning_writes == 2 < len(calls)  # the start, and the first job's leaving
    eager = EngineWorker(tiny_model, EngineSettings(preview_every=0), GenerationSettings())
    expected = run_together(eager, [make_request(1, count=3, steps=3), make_request(2, count=2, steps=5)])
    for got, want in zip(results, expected, strict=True):
        for a, b in zip(got.images, want.images, strict=True):
            assert_same_image(a.png, b.png)


def test_our_bound_not_dynamos_limit_of_eight_decides_how_many_graphs_are_made():
    """Past dynamo's recompile limit (8) it would silently run eager: within engine.compile_graphs
    every shape gets its graph, and the limit of the rest of the process is left as it was."""
    from torch._dynamo.utils import counters

    from engine.batching.graphs import UNetGraphs

    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    graphs = UNetGraphs(torch.compile(lambda sample: sample * 2, backend="eager", dynamic=False), max_graphs=12)
    for rows in range(1, 12):
        graphs.run(sample=torch.ones(rows))
    assert counters["stats"]["unique_graphs"] == 11 > limit
    assert torch._dynamo.config.recompile_limit == limit


def test_shapes_past_the_bound_run_eager_counted_and_logged(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="engine.families.sd.denoiser")
    settings = EngineSettings(preview_every=0, compile="default", compile_graphs=1, max_batch=1)
    worker = EngineWorker(tiny_model, settings, GenerationSettings(), compiler=EAGER_BACKEND)
    results = run_together(worker, [make_request(1, width=64), make_request(2, width=48)])
    denoiser = worker.pipeline.denoiser
    assert len(denoiser.graphs) == 1 and denoiser.eager_calls == 3  # the second job's 3 steps
    assert "UNet graph 1 of at most 1" in caplog.text and "this step runs eager (3 so far)" in caplog.text
    assert graph_counts(worker.pipeline)["unet"] == (1, 3)  # what /metrics reports (sdbot_unet_eager_calls_total)
    assert all(result.images for result in results)


def test_graphs_can_be_made_at_start(tiny_model):
    settings = EngineSettings(preview_every=0, compile="default", compile_capture="start", max_batch=2)
    worker = EngineWorker(tiny_model, settings, GenerationSettings(sizes=("64x64",)), compiler=EAGER_BACKEND)
    run_together(worker, [make_request(1)])
    assert sorted(key[0] for key in worker.pipeline.denoiser.graphs) == [1, 2]  # 2 before any job had 2 rows
    sampler_graphs = worker.pipeline.denoiser.sampler_graphs.graphs  # the default sampler's, for each bucket
    assert sorted((key[0], key[2]) for key in sampler_graphs) == [(1, (("euler_a", None),)), (2, (("euler_a", None),))]


def step_compiles_whole(pipeline: Pipeline, rows: int, *, mixed: bool = False) -> None:
    """The batch's own step arithmetic (``Batch.arithmetic``: the denoiser, each sampler group's
    step, the blend) under ``torch.compile(fullgraph=True)``: a graph break anywhere raises.
    ``mixed``: a second job with a stateful sampler shares the batch (two sampler groups)."""
    batch = Batch(pipeline.denoiser)
    batch.add(pipeline.prepare(make_request(1, count=rows)))
    if mixed:
        batch.add(pipeline.prepare(make_request(2, sampler="dpmpp_2m", steps=4)))
    arguments = (batch.x, batch.by_column(), batch.noise[0], batch.x, batch.by_column()[0], batch.state)
    compiled = torch.compile(batch.arithmetic, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        x_next, denoised, state = compiled(*arguments)
        expected = batch.arithmetic(*arguments)
    torch.testing.assert_close(x_next, expected[0])
    torch.testing.assert_close(denoised, expected[1])
    assert state.keys() == expected[2].keys()


@pytest.mark.parametrize("rows", [1, 12])
def test_the_step_compiles_with_no_graph_break(tiny_model, rows):
    torch._dynamo.reset()
    step_compiles_whole(Pipeline(tiny_model), rows)


def test_a_step_of_two_sampler_groups_compiles_with_no_graph_break(tiny_model):
    torch._dynamo.reset()
    step_compiles_whole(Pipeline(tiny_model), 3, mixed=True)


@pytest.mark.slow
def test_the_step_compiles_with_no_graph_break_for_every_bucket(tiny_model):
    pipeline = Pipeline(tiny_model)
    for rows in BUCKETS:
        torch._dynamo.reset()
        step_compiles_whole(pipeline, rows)


@pytest.mark.parametrize(("key", "value"), [("compile_graphs", 0), ("compile_capture", "eagerly")])
def test_the_compile_settings_are_checked(key, value):
    with pytest.raises(ConfigError, match=f"engine.{key}"):
        parse_engine_sections({"model": {"source": "m.safetensors"}, "engine": {key: value}})
