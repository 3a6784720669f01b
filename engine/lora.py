"""LoRA as people write it in AUTOMATIC1111: ``<lora:NAME:WEIGHT>`` in the prompt.

``NAME`` is a file stem in the model's ``lora_dir`` (``NAME.safetensors``), looked up by name
only: no paths, no ``..``. ``WEIGHT`` defaults to 1. The tags are taken out of the text before
it is encoded (:func:`strip_lora_tags`); a tag in the negative prompt is removed but not applied,
as in AUTOMATIC1111. Reading and checking tags is torch-free, in :mod:`engine.prompt_syntax` (the
bot checks them there); this module applies them.

Loading is diffusers' and peft's: ``lora_state_dict`` converts kohya / A1111 files (``lora_unet_*``,
``lora_te_*``, SDXL's ``lora_te1_*``/``lora_te2_*``) and diffusers-format files, and each LoRA
becomes a named peft adapter on the UNet and the text encoder(s). Switching sets is cheap (the
adapters stay loaded, up to :data:`KEEP_LOADED`); a set applies to a whole batch, which is why
jobs with different sets never share one (:func:`lora_key`, used in the worker's batch key).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.errors import GenerationError
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
    from engine.loading import LoadedModel

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
            _load_adapter(self.model, path, adapter, holders)
        except GenerationError:
            self._delete(name, (adapter, holders))
            raise
        except Exception as e:  # safetensors, diffusers and peft raise many types for a bad or foreign file
            self._delete(name, (adapter, holders))
            log.warning("LoRA %s could not be loaded", path, exc_info=True)
            raise GenerationError(
                f"LoRA {name!r} could not be applied to model {self.model.info.name!r} ({type(e).__name__}); "
                f"is it made for a {self.model.info.family} model?"
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


def _load_adapter(model: LoadedModel, path: Path, adapter: str, holders: list[torch.nn.Module]) -> None:
    """One LoRA file into the model's UNet and text encoder(s) as adapter ``adapter``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.loading import progress_bars

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise GenerationError(f"LoRA file {path.name} is damaged or not a .safetensors file ({e}).") from e
    sdxl = model.info.family == "sdxl"
    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {"unet_config": model.unet.config} if sdxl else {}
    state, alphas = loader.lora_state_dict(tensors, **extra)
    with progress_bars(False), warnings.catch_warnings(), _quiet(logging.getLogger("transformers.integrations.peft")):
        # peft warns on every adapter after the first, and transformers lists the other adapters'
        # weights as "missing" from this one: several adapters is what we want (the tests check
        # that each adapter holds its file's weights).
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        if any(k.startswith("unet.") for k in state):
            holders.append(model.unet)  # before loading: a half-done load is cleaned up too
            model.unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name=adapter)
        prefixes = ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]
        for encoder, prefix in zip(model.text_encoders, prefixes, strict=False):
            if not any(name.startswith("text_model.") for name, _ in encoder.named_parameters()):
                # transformers 5's CLIP text models dropped the ``text_model.`` level that
                # diffusers' converted names still carry: unmatched, peft would leave the adapter
                # at its random initial weights (only a load report says so).
                state, alphas = (
                    _drop_level(state, f"{prefix}.text_model."),
                    _drop_level(alphas, f"{prefix}.text_model."),
                )
            if any(k.startswith(prefix + ".") for k in state):
                holders.append(encoder)
                loader.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix, adapter_name=adapter)


def _drop_level(tensors: dict | None, prefix: str) -> dict | None:
    """``prefix + rest`` -> ``prefix`` minus its last level ``+ rest``."""
    if tensors is None:
        return None
    short = prefix.removesuffix("text_model.")
    return {(short + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()}


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
