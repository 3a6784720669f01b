"""The ControlNets of a model's ``controlnet_dir``, by name, loaded offline and kept on the device.

A ControlNet is a diffusers folder (``config.json`` + weights: ``ControlNetModel.from_pretrained``)
or a single ``.safetensors`` file in the layout AUTOMATIC1111's extension and model sites carry
(``control_v11p_sd15_canny.safetensors``, with or without the ``control_model.`` prefix), read
by diffusers' ``ControlNetModel.from_single_file`` with a config: a folder of the file's stem
beside it when there is one, else the shipped SD 1.5 or SDXL config (engine/data), chosen by
the file's keys, so loading never reaches the hub. A union ControlNet (diffusers'
``ControlNetUnionModel``, xinsir's ControlNet++ for SDXL) is a folder whose config names that
class, or a ``.safetensors`` file in diffusers' layout (as xinsir ship it; no converter reads it)
with its config folder beside it. Pickled ``.pth`` files are refused, as our checkpoints are
(they can run code when loaded). A ControlNet for another family than the model's (its
cross-attention width differs) is refused by name. Loaded ControlNets stay on the device.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import torch

from engine.control_units import controlnet_names
from engine.errors import GenerationError, ModelLoadError
from engine.families.load_tools import load_errors
from engine.families.loading import DATA_DIR

log = logging.getLogger(__name__)

SDXL_KEY_MARK = "label_emb."  # SDXL's added time/text embedding (SD 1.x ControlNets have none)
UNION_KEY_MARK = "task_embedding"  # a union ControlNet's per-type embeddings


class ControlNets:
    """The ControlNets of one folder, loaded lazily by name (the engine worker's thread)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.folder = Path(folder) if folder else None
        self.device, self.dtype = torch.device(device), dtype
        self._loaded: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(controlnet_names(self.folder or ""))

    def get(self, name: str, cross_attention_dim: int | None = None) -> torch.nn.Module:
        """The ControlNet ``name``, checked against the model's cross-attention width."""
        with self._lock:
            if name not in self._loaded:
                try:
                    self._loaded[name] = self._load(name)
                except ModelLoadError as exc:  # the job's failure, not the worker's model's
                    raise GenerationError(f"The ControlNet {name!r} could not be loaded: {exc}") from exc
        net = self._loaded[name]
        if cross_attention_dim is not None and net.config.cross_attention_dim != cross_attention_dim:
            raise GenerationError(
                f"The ControlNet {name!r} is for another model family than this model "
                f"(its prompts are {net.config.cross_attention_dim} wide, the model's {cross_attention_dim}); "
                "pick one made for it."
            )
        return net

    def label(self, name: str) -> str:
        """As the extension names a model: ``name [hash]``, with A1111's old short hash of the file
        (``sd_models.model_hash``, which the extension uses); a folder: its name."""
        path = controlnet_names(self.folder or "").get(name)
        if path is None or path.is_dir():
            return name
        return f"{name} [{legacy_model_hash(path)}]"

    def _load(self, name: str) -> torch.nn.Module:
        from diffusers import ControlNetModel, ControlNetUnionModel

        names = controlnet_names(self.folder or "")
        if name not in names:
            listed = ", ".join(names) or "none are installed"
            raise GenerationError(f"Unknown ControlNet {name!r}; installed: {listed}.")
        path = names[name]
        if path.is_dir():
            cls = ControlNetUnionModel if union_config(path) else ControlNetModel
            with load_errors(path, "a diffusers ControlNet folder"):
                net = cls.from_pretrained(str(path), torch_dtype=self.dtype, local_files_only=True)
        elif path.suffix != ".safetensors":
            raise GenerationError(
                f"The ControlNet {name!r} is a pickled {path.suffix} file, which can run code when loaded; "
                "ask the operator for its .safetensors version."
            )
        elif union_config(path.with_suffix("")) or has_key(path, UNION_KEY_MARK):
            net = self._load_union_file(path)
        else:
            config = single_file_config(path)
            with load_errors(path, f"a ControlNet single file with the config in {config}"):
                net = ControlNetModel.from_single_file(
                    str(path), config=str(config), torch_dtype=self.dtype, local_files_only=True
                )
        log.info("loaded ControlNet %s from %s", name, path)
        return net.to(self.device).eval().requires_grad_(False)

    def _load_union_file(self, path: Path) -> torch.nn.Module:
        """A union ControlNet as one file: xinsir's ship theirs in diffusers' layout
        (``diffusion_pytorch_model_promax.safetensors``), which no converter reads; its config
        comes from a folder of the file's stem beside it."""
        from diffusers import ControlNetUnionModel
        from safetensors.torch import load_file

        config = path.with_suffix("")
        if not union_config(config):
            raise GenerationError(
                f"The union ControlNet {path.stem!r} needs its config.json in a folder {config.name} beside it; "
                "ask the operator to add it."
            )
        with load_errors(path, f"a union ControlNet in diffusers' layout with the config in {config}"):
            net = ControlNetUnionModel.from_config(ControlNetUnionModel.load_config(str(config)))
            net.load_state_dict(load_file(str(path)), strict=True)
        return net.to(self.dtype)


def union_config(folder: Path) -> bool:
    """Whether ``folder`` holds a union ControlNet's config (diffusers' ``ControlNetUnionModel``)."""
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "ControlNetUnionModel"


def has_key(path: Path, mark: str) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(mark in key for key in f.keys())


def single_file_config(path: Path) -> Path:
    """The config folder for a ControlNet file: its own beside it, else the shipped one of its family."""
    sidecar = path.with_suffix("")
    if (sidecar / "config.json").is_file():
        return sidecar
    sdxl = has_key(path, SDXL_KEY_MARK)
    return DATA_DIR / ("controlnet-sdxl" if sdxl else "controlnet-sd1")


def legacy_model_hash(path: Path) -> str:
    """A1111's old model hash: sha256 of the 64 KiB at offset 1 MiB, its first 8 hex digits."""
    import hashlib

    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
