"""Issue 11 §3, the samplers' half of a compiled step (engine.batching.sampler_graphs): the step after the
UNet runs in a graph per (row bucket, latent size, sampler groups), advancing the batch's rows in
place in buffers that each call of a graph finds at the same addresses; jobs give the latents they
give eager, for every sampler, joining, leaving and parked; the graphs are bounded, counted and
logged; and the step compiles whole with ``fullgraph=True``. On the CPU with dynamo's "eager"
backend (the same tracing and guards as on a GPU), and with inductor's real CPU code for the
samplers that hand their history on in place."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from engine.batching.batch import Batch
from engine.batching.sampler_graphs import advance_in_place
from engine.pipeline import Pipeline
from engine.sampling.samplers import SAMPLERS
from engine_harness import denoise_alone
from test_kdiffusion_batching import make_request, mixed_jobs
from tolerance import assert_same_latents


def compiled_pipeline(tiny_model, backend: str = "eager", max_graphs: int = 64, recorder=None) -> Pipeline:
    """A pipeline whose denoiser runs the samplers' step compiled with ``backend``, and the UNet
    as it is (its graphs are tests/test_compile.py's; tracing it costs seconds per shape)."""
    pipeline = Pipeline(tiny_model)

    def compile_with(target):
        return target if isinstance(target, torch.nn.Module) else torch.compile(target, backend=backend, dynamic=False)

    pipeline.denoiser.compile(recorder(compile_with) if recorder else compile_with, max_graphs)
    return pipeline


def run_to_the_end(batch: Batch, together: dict) -> None:
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            together[entry.job.request.job_id] = batch.remove(entry.job)


@pytest.fixture(scope="module")
def eager_pipeline(tiny_model) -> Pipeline:
    return Pipeline(tiny_model)


def test_mixed_samplers_give_the_latents_they_give_eager_joining_leaving_and_parked(tiny_model, eager_pipeline):
    """Samplers of every kind in one batch (two-stage, Brownian, ancestral, with history: a group
    each, their row indices padded to buckets), jobs joining mid-step and one parked and resumed:
    the same latents as each job alone, eager. (Every sampler traces: the fullgraph test below.)"""
    torch._dynamo.reset()
    kinds = {"heun", "dpmpp_sde", "lms", "dpm2_a", "unipc", "euler_a"}
    jobs = [request for request in mixed_jobs() if request.params.sampler in kinds]
    alone = denoise_alone(eager_pipeline, jobs)
    pipeline = compiled_pipeline(tiny_model)
    batch, together = Batch(pipeline.denoiser), {}
    prepared = [pipeline.prepare(request) for request in jobs]
    batch.add(prepared[0])
    batch.step()
    for job in prepared[1:5]:
        batch.add(job)
    batch.step()
    parked = batch.park(prepared[1])
    for job in prepared[5:]:
        batch.add(job)
    batch.step()
    batch.resume(parked)
    run_to_the_end(batch, together)
    assert together.keys() == alone.keys()
    for job_id, latents in alone.items():
        assert_same_latents(together[job_id], latents)
    graphs = pipeline.denoiser.sampler_graphs
    assert graphs.eager_steps == 0 and sum(graphs.graphs.values()) > 0


def test_a_graph_advances_the_rows_in_place_in_buffers_at_the_same_addresses(tiny_model):
    """The graph returns nothing (a CUDA graph's outputs are overwritten at its next replay), and
    each call of a key gets the same tensors; the batch's rows are views of them."""
    calls = []  # (key, x buffer's address, what the graph returned)

    def recorder(compile_with):
        def make(target):
            compiled = compile_with(target)
            if isinstance(target, torch.nn.Module):
                return compiled

            def run(buffers):
                out = compiled(buffers)
                calls.append((buffers.key, buffers.x.data_ptr(), out))
                return out

            return run

        return make

    torch._dynamo.reset()
    pipeline = compiled_pipeline(tiny_model, recorder=recorder)
    batch = Batch(pipeline.denoiser)
    first, second = (
        pipeline.prepare(make_request(1, sampler="lms", count=3)),
        pipeline.prepare(make_request(2, sampler="lms", count=2, steps=6)),
    )
    batch.add(first)
    batch.add(second)  # 5 rows: bucket 8
    for _ in range(2):
        batch.step()
        assert batch.x.data_ptr() == batch.buffers.x.data_ptr() and batch.x.shape[0] == 5
    while not batch.entries[0].done:
        batch.step()
    batch.remove(first)  # 2 rows: bucket 2
    while batch.entries:
        batch.step()
        if batch.entries[0].done:
            batch.remove(second)
    assert [key[0] for key, _, _ in calls] == [8] * 4 + [2] * 2
    assert all(out is None for _, _, out in calls)
    for key in {key for key, _, _ in calls}:
        assert len({address for k, address, _ in calls if k == key}) == 1, f"{key}: new buffers for a call"
    assert set(pipeline.denoiser.sampler_graphs.graphs) == {key for key, _, _ in calls}


def test_a_rejoining_bucket_finds_its_buffers_again(tiny_model):
    """Buffers are kept by key: a bucket that comes back replays on the addresses it was made with."""
    torch._dynamo.reset()
    pipeline = compiled_pipeline(tiny_model)
    batch = Batch(pipeline.denoiser)
    one = pipeline.prepare(make_request(1, sampler="euler", steps=2))
    batch.add(one)
    address = batch.buffers.x.data_ptr()
    batch.add(pipeline.prepare(make_request(2, sampler="euler", steps=2, count=3)))  # bucket 4
    assert batch.buffers.x.data_ptr() != address
    batch.remove(batch.entries[1].job)
    assert batch.buffers.x.data_ptr() == address and torch.equal(batch.x, one.latents.float())


def test_keys_past_the_bound_run_eager_counted_and_logged(tiny_model, eager_pipeline, caplog):
    caplog.set_level(logging.INFO, logger="engine.families.sd.denoiser")
    torch._dynamo.reset()
    requests = [make_request(1, sampler="euler", steps=3), make_request(2, sampler="euler", steps=3, count=2)]
    alone = denoise_alone(eager_pipeline, requests)
    pipeline = compiled_pipeline(tiny_model, max_graphs=1)
    together = {}
    for request in requests:  # one row (bucket 1), then two (bucket 2): past the bound of 1
        batch = Batch(pipeline.denoiser)
        batch.add(pipeline.prepare(request))
        run_to_the_end(batch, together)
    graphs = pipeline.denoiser.sampler_graphs
    assert len(graphs.graphs) == 1 and graphs.eager_steps == 3
    assert "sampler graph 1 of at most 1" in caplog.text
    assert "no sampler graph for 2 rows" in caplog.text and "this step runs eager (3 so far)" in caplog.text
    for job_id, latents in alone.items():
        assert_same_latents(together[job_id], latents)


def test_the_samplers_step_compiles_with_no_graph_break_for_every_sampler(tiny_model):
    """One batch with a job of each sampler: a group each, their row indices padded to buckets."""
    torch._dynamo.reset()
    pipeline = compiled_pipeline(tiny_model)
    batch = Batch(pipeline.denoiser)
    for i, name in enumerate(sorted(SAMPLERS)):
        batch.add(pipeline.prepare(make_request(i + 1, sampler=name, count=1 + i % 3)))
    assert len(batch.buffers.groups) == len(SAMPLERS)
    before = batch.buffers.x.clone()
    with torch.inference_mode():
        torch.compile(advance_in_place, fullgraph=True, backend="eager", dynamic=False)(batch.buffers)
    assert not torch.equal(batch.buffers.x, before)


@pytest.mark.parametrize("name", ["lms", "unipc", "dpmpp_3m_sde"])
def test_inductor_builds_the_samplers_step_and_it_gives_the_eager_latents(tiny_model, eager_pipeline, name):
    """The real compiler, not only its tracing: inductor's CPU code for a batch whose history is
    handed on in place (LMS's ``d2`` becomes ``d1``'s old value) gives the latents of eager. With
    ``clone()`` it did not: every new value must be read before the first is written
    (engine.batching.sampler_graphs.fresh)."""
    torch._dynamo.reset()
    requests = [make_request(1, sampler=name, steps=4, count=2)]
    alone = denoise_alone(eager_pipeline, requests)
    pipeline = compiled_pipeline(tiny_model, backend="inductor")
    batch, together = Batch(pipeline.denoiser), {}
    batch.add(pipeline.prepare(requests[0]))
    run_to_the_end(batch, together)
    assert pipeline.denoiser.sampler_graphs.graphs and pipeline.denoiser.sampler_graphs.eager_steps == 0
    assert_same_latents(together[1], alone[1])


def test_every_input_of_both_graphs_is_a_static_address(tiny_model):
    """What CUDA graph trees act on, read where AOTAutograd decides it: an input that is not
    static would be copied into the graph's own memory at every replay, and a graph that writes
    one would not be captured at all. Every input of the UNet's graph and the sampler's is static."""
    decided: list[str] = []

    class Decisions(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "static input pos" in message:
                decided.append(message)

    from torch._functorch._aot_autograd.frontend_utils import static_inputs_log

    handler = Decisions()
    torch._dynamo.reset()
    torch._logging.set_logs(cudagraph_static_inputs=True)
    static_inputs_log.addHandler(handler)
    try:
        pipeline = Pipeline(tiny_model)
        pipeline.denoiser.compile(functools.partial(torch.compile, backend="aot_eager", dynamic=False))
        batch = Batch(pipeline.denoiser)
        batch.add(pipeline.prepare(make_request(1, sampler="lms", count=3)))
        batch.add(pipeline.prepare(make_request(2, sampler="euler_a", count=2)))  # two groups, noise
        with torch.inference_mode():
            batch.step()
    finally:
        static_inputs_log.removeHandler(handler)
        torch._logging.set_logs()
    sources = [message.rsplit("for source ", 1)[1] for message in decided]
    assert {"L['buffers'].x", "L['buffers'].state['d3']", "L['buffers'].groups[1].index"} <= set(sources)
    assert any("sample" in source for source in sources)  # the UNet's latents
    assert not [message for message in decided if message.startswith("Non-static")]
