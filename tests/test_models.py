"""Several models: config tables, the pool (on demand, LRU), and whose turn it is, end to end
through the runner with a real SQLite queue and two tiny models."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from db.models import JobStatus
from engine.config.settings import ConfigError, EngineSettings, GenerationSettings, ModelSettings, parse_engine_sections
from engine.errors import GenerationError, ModelLoadError
from engine.metadata import read_parameters
from engine.serving.models import ModelPool, ModelTurns, batch_key
from engine.serving.runner import QueueRunner
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest
from engine_harness import run_until, sqlite_queue  # noqa: F401 - sqlite_queue is a fixture

JOB = dict(prompt="a red fox", steps=2, guidance=5.0, width=64, height=64, sampler="euler", channel_id=1)


# ---------------------------------------------------------------------------- config


def test_models_tables_add_named_models_after_the_default():
    settings = parse_engine_sections(
        {
            "model": {"source": "models/base.safetensors"},
            "models": {
                "anime": {"source": "models/anything", "family": "sd1", "lora_dir": "loras/anime"},
                "xl": {"source": "models/xl.safetensors", "family": "sdxl"},
            },
            "engine": {"max_loaded_models": 2, "model_switch_after": 30},
        }
    )
    assert [m.display_name for m in settings.all_models] == ["base", "anime", "xl"]
    assert settings.models[0].lora_dir == "loras/anime"
    assert settings.engine.max_loaded_models == 2 and settings.engine.model_switch_after == 30.0


def test_without_a_model_table_the_first_named_model_is_the_default():
    settings = parse_engine_sections({"models": {"one": {"source": "a"}, "two": {"source": "b"}}})
    assert settings.model.display_name == "one"
    assert [m.display_name for m in settings.all_models] == ["one", "two"]
    # No model configured at all: the single default [model] as before.
    assert parse_engine_sections({}).all_models == (ModelSettings(),)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"source": "x/base.safetensors"}, "models": {"base": {"source": "y"}}},
            "each model needs its own name",
        ),
        ({"models": {"a": {"source": "x", "family": "sd4"}}}, r"models\.a\.family = 'sd4'"),
        ({"models": {"a": {"source": ""}}}, r"models\.a\.source"),
        ({"models": {"a": {"source": "x", "name": "b"}}}, r"models\.a\.name"),
        ({"models": {"a": {"source": "x", "colour": 1}}}, r"models\.a\.colour: unknown key"),
        ({"models": {"a": "x"}}, r"\[models\] must hold one table per model"),
        ({"engine": {"max_loaded_models": 0}}, r"engine\.max_loaded_models = 0"),
    ],
)
def test_bad_model_config_names_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_engine_sections(raw)


# ---------------------------------------------------------------------------- the pool


@pytest.fixture(scope="module")
def load_tiny(tiny_sd_folder, tiny_sd_single_file):
    """A loader for the pool that counts loads: 'b' is the single-file copy, others the folder."""
    import torch

    from engine.families.loading import load_model

    loads: Counter[str] = Counter()

    def load(model: ModelSettings):
        loads[model.display_name] += 1
        source = tiny_sd_single_file if model.display_name == "b" else tiny_sd_folder
        return load_model(str(source), device="cpu", dtype=torch.float32, name=model.display_name, progress=False)

    load.loads = loads
    return load


def pool_of(load, names, max_loaded):
    load.loads.clear()
    return ModelPool([ModelSettings(source=n, name=n) for n in names], max_loaded=max_loaded, load=load)


def test_pool_loads_on_demand_and_the_least_recently_used_leaves_first(load_tiny):
    pool = pool_of(load_tiny, ["a", "b", "c"], max_loaded=2)
    assert pool.loaded() == [] and pool.default == "a"
    first = pool.pipeline(None)  # None: the default model
    assert pool.pipeline("a") is first and load_tiny.loads == {"a": 1}
    pool.pipeline("b")
    pool.pipeline("a")  # a is now the most recently used
    pool.pipeline("c")  # room for two: b leaves
    assert pool.loaded() == ["a", "c"]
    pool.pipeline("b")
    assert pool.loaded() == ["c", "b"]
    assert load_tiny.loads == {"a": 1, "b": 2, "c": 1}
    assert pool.pipeline("b").model.info.name == "b"


def test_pool_refuses_a_model_it_does_not_know(load_tiny):
    pool = pool_of(load_tiny, ["a"], max_loaded=1)
    with pytest.raises(GenerationError, match="No model named 'z' here; available: a"):
        pool.pipeline("z")
    assert pool.loaded() == []


# ---------------------------------------------------------------------------- turns


def test_turns_stay_with_the_current_model_while_it_has_work():
    turns = ModelTurns(["a", "b"], "a", switch_after=60)
    assert turns.choose({}, [], now=0) is None
    assert turns.choose({None: 5, "b": 10}, ["a"], now=0) == "a"  # loaded models first; None is a
    assert turns.choose({"a": 1, "b": 50}, ["a"], now=10) == "a"  # b has not waited past the bound
    assert turns.choose({"b": 50}, ["a"], now=11) == "b"  # a has nothing left: b's turn
    assert turns.choose({"a": 100, "b": 2}, ["b"], now=12) == "b"  # switched 1 s ago: no thrashing
    assert turns.choose({"a": 100, "b": 2}, ["b"], now=71) == "a"  # a waited past the bound: its turn


def test_turns_give_an_unloaded_model_its_fair_turn():
    turns = ModelTurns(["a", "b", "c"], "a", switch_after=30)
    assert turns.choose({"a": 1, "b": 5, "c": 3}, ["a"], now=0) == "a"
    # b and c wait while a keeps getting work; the one waiting longest goes first once overdue.
    assert turns.choose({"a": 1, "b": 31, "c": 40}, ["a"], now=31) == "c"
    # A model whose oldest job waited longer than the overdue one keeps its turn.
    turns = ModelTurns(["a", "b"], "a", switch_after=30, current="a")
    assert turns.choose({"a": 90, "b": 40}, ["a"], now=100) == "a"
    # Jobs for models this worker does not serve are not its business.
    assert ModelTurns(["a"], "a").choose({"other": 500}, [], now=0) is None


def test_batch_key_is_the_model_not_the_lora_set():
    """LoRA sets run per row (engine.features.lora_slots): they share batches."""

    def request(prompt, model=None):
        return GenerationRequest.of(job_id=1, prompt=prompt, seed=1, model=model)

    assert batch_key(request("a cat"), "base") == batch_key(request("a dog", "base"), "base")
    assert batch_key(request("a cat"), "base") != batch_key(request("a cat", "xl"), "base")
    assert batch_key(request("<lora:x:0.5> cat")) == batch_key(request("<lora:y:0.6> cat")) == batch_key(request("cat"))


# ---------------------------------------------------------------------------- end to end


def test_runner_groups_jobs_by_model_and_loads_each_once(sqlite_queue, load_tiny):
    """Jobs for two models, interleaved in the queue, with room for one model: each model is
    loaded once, every job of the model in turn is done before the switch, and each image says
    which model made it."""
    pool = pool_of(load_tiny, ["a", "b"], max_loaded=1)
    engine = EngineSettings(max_batch=4, model_switch_after=600)
    worker = EngineWorker(pool, engine, GenerationSettings(max_steps=50, max_width=256, max_height=256))
    models = [None, "b", "a", "b", "a"]  # None: the default model, a
    jobs = [sqlite_queue.enqueue(requester_id=i + 1, seed=i, model=m, **JOB) for i, m in enumerate(models)]
    finished: list[int] = []
    runner = QueueRunner(
        sqlite_queue,
        worker,
        worker_id="w1",
        on_finished=finished.append,
        max_in_flight=4,
        poll_interval=0.05,
        turns=ModelTurns.for_pool(pool, engine),
    )
    worker.start()
    try:
        asyncio.run(run_until(runner, sqlite_queue, [j.id for j in jobs]))
    finally:
        worker.stop()
    assert [sqlite_queue.get(j.id).status for j in jobs] == [JobStatus.done] * 5
    assert load_tiny.loads == {"a": 1, "b": 1}
    by_id = {j.id: (m or "a") for j, m in zip(jobs, models, strict=False)}
    assert [by_id[i] for i in finished] == ["a", "a", "a", "b", "b"]
    for job in jobs:
        png = sqlite_queue.images(job.id)[0].png
        assert read_parameters(png)["Model"] == by_id[job.id]


def test_a_job_for_an_unknown_model_fails_with_the_names(load_tiny):
    pool = pool_of(load_tiny, ["a"], max_loaded=1)
    worker = EngineWorker(pool, EngineSettings(max_batch=2), GenerationSettings(max_width=256, max_height=256))
    worker.start()
    try:
        request = GenerationRequest.of(job_id=9, prompt="x", seed=1, steps=2, width=64, height=64, model="gone")
        with pytest.raises(GenerationError, match="No model named 'gone'"):
            worker.generate_blocking(request)
        # The worker goes on with the default model afterwards.
        ok = worker.generate_blocking(GenerationRequest.of(job_id=10, prompt="x", seed=1, steps=2, width=64, height=64))
        assert ok.images
    finally:
        worker.stop()


def test_pool_unloads_more_models_when_memory_runs_out(load_tiny):
    """Memory for one model only: loading a second one drops the first instead of failing."""

    def load(model: ModelSettings):
        if pool.loaded():  # a fake device that fits one model
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return load_tiny(model)

    pool = ModelPool([ModelSettings(source=n, name=n) for n in "ab"], max_loaded=2, load=load)
    pool.pipeline("a")
    assert pool.pipeline("b").model.info.name == "b"
    assert pool.loaded() == ["b"]


def test_pool_says_so_when_a_model_does_not_fit_even_alone(load_tiny):
    def load(model: ModelSettings):
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    pool = ModelPool([ModelSettings(source="a", name="a")], max_loaded=1, load=load)
    with pytest.raises(ModelLoadError, match="Not enough GPU memory to load model 'a' even alone"):
        pool.pipeline("a")
