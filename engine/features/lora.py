"""LoRA as people write it in AUTOMATIC1111: ``<lora:NAME:WEIGHT>`` in the prompt.

``NAME`` is a file stem in the model's ``lora_dir`` (``NAME.safetensors``), looked up by name
only: no paths, no ``..``. ``WEIGHT`` defaults to 1. The tags are taken out of the text before
it is encoded (:func:`strip_lora_tags`); a tag in the negative prompt is removed but not applied,
as in AUTOMATIC1111. Reading and checking tags is torch-free, in :mod:`engine.prompt_syntax` (the
bot checks them there); this module applies them.

Loading is diffusers' and peft's, per family (:mod:`engine.features.lora_loading`: which layouts each
family reads): each LoRA becomes a named peft adapter on the denoising network (the UNet, or SD
3.5's and Flux's transformer) and the text encoder(s) it changes. Switching sets is cheap (the
adapters stay loaded, up to :data:`KEEP_LOADED`); a set applies to a whole batch, which is why
jobs with different sets never share one (:func:`lora_key`, used in the worker's batch key), and
the prompt encoders key their caches by it (``variant``), since a LoRA may change a text encoder.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.errors import GenerationError
from engine.families import traits
from engine.features.lora_loading import load_adapter
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

# The tag parsing names, kept importable from here, and this module's own.
__all__ = [
    "KEEP_LOADED",
    "LORA_NAME",
    "LORA_SUFFIX",
    "LORA_TAG",
    "MAX_LORA_WEIGHT",
    "MAX_WEIGHT",
    "SUFFIX",
    "LoraKey",
    "LoraLibrary",
    "LoraUse",
    "available_loras",
    "check_lora_name",
    "find_lora",
    "lora_key",
    "parse_lora_key",
    "strip_lora_tags",
]

log = logging.getLogger(__name__)

#: Adapters kept loaded on the model after their set went out of use (least recently used leave).
KEEP_LOADED = 8
_ADAPTER_IDS = itertools.count(1)  # peft adapter names, unique in the process
_LIBRARIES: weakref.WeakKeyDictionary[torch.nn.Module, LoraLibrary] = weakref.WeakKeyDictionary()
# The names the tag parsing had here before it moved to engine.prompt_syntax.
SUFFIX, MAX_WEIGHT = LORA_SUFFIX, MAX_LORA_WEIGHT


class LoraLibrary:
    """The LoRA files of one model's folder, loaded as peft adapters on that model on demand.

    Used from the worker thread only. :meth:`activate` makes a set current before a batch's jobs
    are prepared (their prompts go through the text encoder with the set applied); the empty set
    disables every adapter, so the model is exactly the checkpoint again.
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
        # name -> (adapter id, modules that hold it), most recently used last
        self._loaded: OrderedDict[str, tuple[str, list[torch.nn.Module]]] = OrderedDict()

    def available(self) -> list[str]:
        return available_loras(self.folder)

    def activate(self, key: LoraKey) -> None:
        """Make this prompt's LoRA set the one applied (raises GenerationError for a bad set)."""
        uses = parse_lora_key(key)
        if uses == self.active:
            return
        with torch.inference_mode(False):  # adapter weights are real parameters, made outside inference mode
            for use in uses:
                self._load(use.name)
            self._apply(uses)
        self.active = uses

    # ------------------------------------------------------------------ internals

    @property
    def _modules(self) -> list[torch.nn.Module]:
        return [self.model.unet, *self.model.text_encoders]

    def _path(self, name: str) -> Path:
        return find_lora(self.folder, name)

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
        from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

        for module in self._modules:
            mine = [(self._loaded[u.name][0], u.weight) for u in uses if module in self._loaded[u.name][1]]
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
