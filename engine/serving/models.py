"""Several models on one GPU: which are loaded, and whose turn it is.

Two small parts, one per side of the queue:

- :class:`ModelPool` (the engine worker's thread): the configured models by name; loads one on
  demand and keeps at most ``engine.max_loaded_models`` on the device, the least recently used
  leaving first (dropped, then the allocator's cache emptied, before the next one loads).
- :class:`ModelTurns` (the queue runner): which model to claim jobs for next. It stays with the
  current model while that has work, so batches stay full and nothing reloads per job; another
  model gets its turn when the current one has no claimable work, or once that model's oldest
  job has waited ``engine.model_switch_after`` seconds (and longer than the current model's
  oldest), at most once per that many seconds: a job for an unloaded model waits a bounded time,
  and the worker never thrashes between models.

The worker's batches never mix models: :func:`batch_key` says which jobs may share one.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.errors import GenerationError, ModelLoadError
from engine.serving.memory import free_memory

if TYPE_CHECKING:
    from engine.config.settings import EngineSettings, ModelSettings
    from engine.families.loading import LoadedModel
    from engine.pipeline import Pipeline
    from engine.types import GenerationRequest

log = logging.getLogger(__name__)


def batch_key(request: GenerationRequest, default_model: str | None = None) -> Hashable:
    """Jobs share a batch only with the same key: the same model and the same tiling (set per
    module, engine.features.tiling). LoRA sets run per row (engine.features.lora_slots); the worker
    adds the set of one that cannot (engine.features.lora.LoraLibrary.batch_part)."""
    return (request.params.model or default_model, request.params.tiling)


class ModelPool:
    """The configured models, loaded on demand, at most ``max_loaded`` at a time (LRU).

    :meth:`pipeline` is for the engine worker's thread only; :meth:`loaded` may be read from any.
    ``load`` turns a model's settings into a :class:`LoadedModel` (injectable for tests).
    """

    def __init__(
        self, models: Sequence[ModelSettings], *, max_loaded: int = 1, load: Callable[[ModelSettings], LoadedModel]
    ) -> None:
        if not models:
            raise ValueError("ModelPool needs at least one model")
        self.settings = {m.display_name: m for m in models}
        self.default = models[0].display_name
        self.max_loaded = max(1, max_loaded)
        self._load = load
        self._pipelines: OrderedDict[str, Pipeline] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    @classmethod
    def configured(cls, models: Sequence[ModelSettings], engine: EngineSettings, *, progress: bool = True) -> ModelPool:
        """The models of config.toml, loaded on ``[engine]``'s device (with download progress bars)."""
        from engine.families.loading import load_configured_model

        return cls(
            models,
            max_loaded=engine.max_loaded_models,
            load=lambda model: load_configured_model(model, engine, progress=progress),
        )

    @classmethod
    def single(cls, model: LoadedModel) -> ModelPool:
        """A pool of one model that is loaded already (tests, the CLI)."""
        from engine.config.settings import ModelSettings
        from engine.pipeline import Pipeline

        pool = cls(
            [ModelSettings(source=model.info.extra.get("source", model.info.name), name=model.info.name)],
            load=lambda _: model,
        )
        pool._pipelines[pool.default] = Pipeline(model)
        return pool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.settings)

    def canonical(self, name: str | None) -> str:
        """A job's model name: None means the default model."""
        return name or self.default

    def loaded(self) -> list[str]:
        """Names of the models on the device, least recently used first (any thread)."""
        with self._lock:
            return list(self._pipelines)

    def pipeline(self, name: str | None) -> Pipeline:
        """The pipeline of model ``name``, loaded now if need be (worker thread only).

        Raises GenerationError for a name that is not configured, ModelLoadError when it does not load.
        """
        name = self.canonical(name)
        with self._lock:
            if name in self._pipelines:
                self._pipelines.move_to_end(name)
                return self._pipelines[name]
        if name not in self.settings:
            raise GenerationError(f"No model named {name!r} here; available: {', '.join(self.settings)}.")
        self._make_room(self.max_loaded - 1)
        pipeline = None
        while pipeline is None:
            log.info("loading model %s (%s)", name, self.settings[name].source)
            try:
                pipeline = self._new_pipeline(name)
            except torch.OutOfMemoryError:
                # As many models stay loaded as memory allows: the least recently used leaves
                # and the load is tried again, until this model is the only one.
                others = len(self.loaded())
                self._make_room(others - 1) if others else free_memory()
                if not others:
                    raise ModelLoadError(
                        f"Not enough GPU memory to load model {name!r} even alone; "
                        'use a smaller model or engine.dtype = "float16".'
                    ) from None
        with self._lock:
            self._pipelines[name] = pipeline
        return pipeline

    def _new_pipeline(self, name: str) -> Pipeline:
        from engine.pipeline import Pipeline

        with torch.inference_mode(False):  # weights made here must stay usable outside inference mode
            return Pipeline(self._load(self.settings[name]))

    def _make_room(self, keep: int) -> None:
        """Drop the least recently used models until at most ``keep`` remain, then free their memory."""
        dropped = []
        with self._lock:
            while len(self._pipelines) > keep:
                dropped.append(self._pipelines.popitem(last=False)[0])
        if dropped:
            log.info("unloading model(s) %s to make room", ", ".join(dropped))
            free_memory()  # pipelines hold reference cycles (modules, hooks)

    def unload_all(self) -> None:
        self._make_room(0)


@dataclass
class ModelTurns:
    """Which model the queue runner claims jobs for next (see the module docstring)."""

    names: Sequence[str]
    default: str
    switch_after: float = 120.0
    current: str | None = None
    switched_at: float = field(default=float("-inf"))

    @classmethod
    def for_pool(cls, pool: ModelPool, engine: EngineSettings) -> ModelTurns:
        return cls(pool.names, pool.default, engine.model_switch_after)

    def choose(self, waiting: Mapping[str | None, float], loaded: Sequence[str], now: float) -> str | None:
        """The model to claim for, given each model's oldest queued job's wait in seconds.

        ``waiting`` may name models this worker does not serve (ignored); None is the default model.
        ``loaded``: models on the device now, preferred when the current model has no work.
        """
        waits: dict[str, float] = {}
        for name, wait in waiting.items():
            name = name or self.default
            if name in self.names:
                waits[name] = max(wait, waits.get(name, wait))
        if not waits:
            return None
        current = self.current
        if current in waits:
            others = {m: w for m, w in waits.items() if m != current}
            overdue = {m: w for m, w in others.items() if w >= self.switch_after and w > waits[current]}
            if not overdue or now - self.switched_at < self.switch_after:
                return current
            return self._switch(max(overdue, key=overdue.get), now)
        # The current model has no claimable work: a model already loaded goes first unless
        # another has waited past the bound, then the longest-waiting model.
        overdue = {m: w for m, w in waits.items() if w >= self.switch_after}
        ready = {m: w for m, w in waits.items() if m in loaded}
        pool = overdue or ready or waits
        return self._switch(max(pool, key=pool.get), now)

    def _switch(self, name: str, now: float) -> str:
        if name != self.current:
            log.info("model turn: %s (was %s)", name, self.current)
            self.current, self.switched_at = name, now
        return name
