"""LoRA as people write it in AUTOMATIC1111: ``<lora:NAME:WEIGHT>`` in the prompt.

``NAME`` is a file stem in the model's ``lora_dir`` (``NAME.safetensors``), looked up by name
only: no paths, no ``..``. ``WEIGHT`` defaults to 1. The tags are taken out of the text before
it is encoded (:func:`strip_lora_tags`); a tag in the negative prompt is removed but not applied,
as in AUTOMATIC1111. Reading and checking tags is torch-free, in :mod:`engine.prompt_syntax` (the
bot checks them there); this module applies them.

Loading is diffusers' and peft's, per family (:mod:`engine.features.lora_loading`: which layouts each
family reads): each LoRA becomes a named peft adapter on the denoising network (the UNet, or SD
3.5's and Flux's transformer) and the text encoder(s) it changes (the adapters stay loaded, up to
:data:`KEEP_LOADED`). Then, per job:

- the text encoders get the job's set through peft when its prompts are encoded (at prepare), and
  the prompt encoders key their caches by it (``variant``);
- the denoising network runs it per row (:mod:`engine.features.lora_slots`): the LoRA is copied
  into a slot and the job's rows carry their slots and weights, so jobs with different sets share
  a batch;
- a set that cannot run per row (a LoRA over ``engine.lora_max_rank``, DoRA or other layers the
  slots do not take, more LoRAs than ``engine.lora_slots``) is applied to the whole network
  through peft, as before the slots, in a batch of its own: :meth:`LoraLibrary.batch_part` is
  the set for those, which the worker adds to its batch key. Logged, and counted in /metrics
  (:attr:`LoraLibrary.whole_jobs`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.errors import GenerationError
from engine.families import traits
from engine.features.lora_loading import load_adapter
from engine.features.lora_slots import LoraSlots, SlotsBusy
from engine.prompt_syntax import (
    LORA_NAME,
    LORA_SUFFIX,
    LORA_TAG,
    MAX_LORA_WEIGHT,
    LoraKey,
    LoraUse,
    available_loras,
    check_lora_name,
    find_lora,
    lora_key,
    parse_lora_key,
    strip_lora_tags,
)

if TYPE_CHECKING:
    from engine.families.loading import LoadedModel
    from engine.types import GenerationRequest

# The tag parsing names, kept importable from here, and this module's own.
__all__ = [
    "KEEP_LOADED",
    "LORA_NAME",
    "LORA_SUFFIX",
    "LORA_TAG",
    "MAX_LORA_WEIGHT",
    "MAX_WEIGHT",
    "SUFFIX",
    "SlotsBusy",
    "LoraKey",
    "LoraLibrary",
    "LoraUse",
    "available_loras",
    "batch_part",
    "check_lora_name",
    "find_lora",
    "lora_key",
    "parse_lora_key",
    "strip_lora_tags",
]

log = logging.getLogger(__name__)

#: ``engine.lora_slots`` and ``engine.lora_max_rank`` for a model loaded without settings (tests, the CLI).
DEFAULT_SLOTS, DEFAULT_MAX_RANK = 4, 64
#: Adapters kept loaded on the model after their set went out of use (least recently used leave).
KEEP_LOADED = 8
_ADAPTER_IDS = itertools.count(1)  # peft adapter names, unique in the process
_LIBRARIES: weakref.WeakKeyDictionary[torch.nn.Module, LoraLibrary] = weakref.WeakKeyDictionary()
# The names the tag parsing had here before it moved to engine.prompt_syntax.
SUFFIX, MAX_WEIGHT = LORA_SUFFIX, MAX_LORA_WEIGHT


class LoraLibrary:
    """The LoRA files of one model's folder, loaded as peft adapters on that model on demand, and
    copied into the denoising network's slots (:class:`~engine.features.lora_slots.LoraSlots`).

    Used from the worker thread only. :meth:`activate` makes a job's set current before its
    prompts go through the text encoders; :meth:`per_row` gives its rows their slots. The empty
    set disables every adapter, so the model is exactly the checkpoint again.
    """

    @classmethod
    def of(cls, model: LoadedModel) -> LoraLibrary:
        """The model's library: one per model, however many pipelines use it, since the adapters
        live on the model's modules and the library must know which are on."""
        library = _LIBRARIES.get(model.unet)
        if library is None:
            library = _LIBRARIES[model.unet] = cls(model, model.lora_dir)
        library.folder = Path(model.lora_dir).expanduser() if model.lora_dir else None
        return library

    def __init__(self, model: LoadedModel, folder: str | Path | None) -> None:
        self.model = model
        self.folder = Path(folder).expanduser() if folder else None
        self.active: tuple[LoraUse, ...] = ()
        self.whole = False  # the active set is applied to the whole network (peft), not per row
        # name -> (adapter id, modules that hold it), most recently used last
        self._loaded: OrderedDict[str, tuple[str, list[torch.nn.Module]]] = OrderedDict()
        count = getattr(model, "lora_slots", DEFAULT_SLOTS)
        rank = getattr(model, "lora_max_rank", DEFAULT_MAX_RANK)
        self.slots = LoraSlots(model.unet, count, rank, model.dtype) if count else None
        self._row_slots: list[tuple[int, float]] = []  # the active set's (slot, weight) per row
        self._whole_why: dict[tuple[str, int], str | None] = {}  # (file, mtime) -> why it runs whole
        self.whole_jobs = 0  # jobs whose set ran on the whole network, in a batch of its own

    def available(self) -> list[str]:
        return available_loras(self.folder)

    def activate(self, key: LoraKey) -> None:
        """Make this prompt's LoRA set the one applied (raises GenerationError for a bad set, and
        :class:`SlotsBusy` when its LoRAs find no slot now or turn out to need a batch of their own)."""
        uses = parse_lora_key(key)
        why = self.runs_whole(key)
        if why is not None:
            self.whole_jobs += 1
            log.info("LoRA set %s runs in a batch of its own: %s", key, why)
        if (uses, why is not None) == (self.active, self.whole):
            return
        with torch.inference_mode(False):  # adapter weights are real parameters, made outside inference mode
            for use in uses:
                self._load(use.name)
            self.active, self.whole = (), why is not None  # activated again if placing raises
            self._apply(uses)
            self._row_slots = [] if self.whole else self._place(uses)
            self.active = uses

    def runs_whole(self, key: LoraKey) -> str | None:
        """Why this set runs on the whole network in a batch of its own, or None: per row."""
        uses = parse_lora_key(key)
        if not uses:
            return None
        if self.slots is None:
            return "engine.lora_slots is 0"
        if len(uses) > self.slots.count:
            return f"it has {len(uses)} LoRAs, more than engine.lora_slots ({self.slots.count})"
        for use in uses:
            if why := self._file_runs_whole(use.name):
                return f"LoRA {use.name!r}: {why}"
        return None

    def batch_part(self, key: LoraKey) -> Hashable:
        """What of the set the worker's batch key holds: the set when it runs whole, else None
        (sets that run per row share batches)."""
        try:
            return key if self.runs_whole(key) else None
        except GenerationError:
            return key  # a bad tag: it fails alone at prepare

    def per_row(self, cond):
        """``cond`` with the active set's slots and weights on every row (the family's conditioning
        has a ``lora`` field), or ``cond`` as it is when no LoRA changes the network per row."""
        if not self._row_slots:
            return cond
        rows = self.slots.rows(self._row_slots, cond.embeds.shape[0], cond.embeds.device)
        return dataclasses.replace(cond, lora=rows)

    # ------------------------------------------------------------------ internals

    @property
    def _modules(self) -> list[torch.nn.Module]:
        return [self.model.unet, *self.model.text_encoders]

    def _path(self, name: str) -> Path:
        return find_lora(self.folder, name)

    def _place(self, uses: tuple[LoraUse, ...]) -> list[tuple[int, float]]:
        """The set's network LoRAs in slots (raises SlotsBusy: see :meth:`activate`)."""
        placed: list[tuple[int, float]] = []
        for use in uses:
            adapter, holders = self._loaded[use.name]
            if self.model.unet not in holders:
                continue  # it changes only text encoders
            if why := self.slots.why_not(adapter):
                self._whole_why[self._stamp(use.name)] = why  # retried, it goes into a batch of its own
                log.warning("LoRA %s runs in a batch of its own: %s", use.name, why)
                raise SlotsBusy(f"LoRA {use.name!r} runs in a batch of its own: {why}")
            try:
                placed.append((self.slots.place(use.name, adapter, {slot for slot, _ in placed}), use.weight))
            except SlotsBusy as e:
                log.info("a job with LoRA %s waits: %s", use.name, e)
                raise
        return placed

    def _stamp(self, name: str) -> tuple[str, int]:
        path = self._path(name)
        return str(path), path.stat().st_mtime_ns

    def _file_runs_whole(self, name: str) -> str | None:
        """Why a LoRA file cannot run per row, read from its header (shapes, names) once per version."""
        try:
            stamp = self._stamp(name)
        except (GenerationError, OSError):
            return None  # prepare says what is wrong with it
        if stamp not in self._whole_why:
            self._whole_why[stamp] = header_runs_whole(Path(stamp[0]), self.slots.rank)
            if self._whole_why[stamp]:
                log.warning("LoRA %s runs in a batch of its own: %s", name, self._whole_why[stamp])
        return self._whole_why[stamp]

    def _load(self, name: str) -> None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        path = self._path(name)
        while len(self._loaded) >= KEEP_LOADED:
            self._delete(*self._loaded.popitem(last=False))
        adapter = f"lora{next(_ADAPTER_IDS)}"  # peft adapter names become module keys: no dots allowed
        holders: list[torch.nn.Module] = []
        try:
            load_adapter(self.model, path, adapter, holders)
        except GenerationError:
            self._delete(name, (adapter, holders))
            raise
        except Exception as e:  # safetensors, diffusers and peft raise many types for a bad or foreign file
            self._delete(name, (adapter, holders))
            log.warning("LoRA %s could not be loaded", path, exc_info=True)
            raise GenerationError(
                f"LoRA {name!r} could not be applied to model {self.model.info.name!r} ({type(e).__name__}); "
                f"is it a LoRA for {traits(self.model.info.family).label} models?"
            ) from e
        if not holders:
            raise GenerationError(
                f"LoRA {name!r} changes nothing in model {self.model.info.name!r}; is it a LoRA file?"
            )
        self._loaded[name] = (adapter, holders)
        log.info("loaded LoRA %s into %s", name, self.model.info.name)

    def _apply(self, uses: tuple[LoraUse, ...]) -> None:
        """The set through peft on the text encoders, and on the network too when it runs whole."""
        from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

        for module in self._modules:
            mine = [(self._loaded[u.name][0], u.weight) for u in uses if module in self._loaded[u.name][1]]
            if module is self.model.unet and not self.whole:
                mine = []  # per row, from the slots
            if not mine:
                if getattr(module, "peft_config", None):
                    set_adapter_layers(module, enabled=False)
                continue
            set_adapter_layers(module, enabled=True)
            set_weights_and_activate_adapters(module, [a for a, _ in mine], [w for _, w in mine])

    def _delete(self, name: str, loaded: tuple[str, list[torch.nn.Module]]) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        adapter, holders = loaded
        for module in holders:
            delete_adapter_layers(module, adapter)
            config = getattr(module, "peft_config", None)
            if isinstance(config, dict):
                config.pop(adapter, None)
        self.active = tuple(u for u in self.active if u.name != name)


def batch_part(library: LoraLibrary | None, request: GenerationRequest) -> Hashable:
    """What of a job's LoRA set the worker's batch key holds (:meth:`LoraLibrary.batch_part`);
    the whole set while its model is not loaded (``library`` None): told apart once it is."""
    key = lora_key(request.params.prompt)
    return key if library is None else library.batch_part(key)


#: Names in a LoRA file that the slots cannot run per row (DoRA's magnitudes, biases of the up
#: weights, LyCORIS' LoHa and LoKr, which diffusers does not read either).
WHOLE_ONLY = ("dora_scale", "lora_magnitude_vector", "lora_B.bias", "lora_up.bias", "hada_", "lokr_")
#: How a file names a pair's down weight, whose first dimension is the rank.
DOWN_WEIGHTS = ("lora_down.weight", "lora_A.weight", ".down.weight")


def header_runs_whole(path: Path, max_rank: int) -> str | None:
    """Why a LoRA file cannot run per row, from its header alone (no tensor is read), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as file:
            rank = 0
            for key in file.keys():
                if any(part in key for part in WHOLE_ONLY):
                    return f"its weight {key} is not a plain low-rank pair"
                if key.endswith(DOWN_WEIGHTS):
                    rank = max(rank, file.get_slice(key).get_shape()[0])
    except (SafetensorError, OSError):
        return None  # loading it says what is wrong
    return f"its rank {rank} is over engine.lora_max_rank ({max_rank})" if rank > max_rank else None
