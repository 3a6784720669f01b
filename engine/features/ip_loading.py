"""A model's IP-Adapter (``model.ip_adapter``) and CLIP image encoder (``model.image_encoder``),
loaded offline on the first job with a reference and kept on the device.

The adapter is a ``.safetensors`` file in the layout diffusers' ``load_ip_adapter`` reads
(``ip-adapter_sd15.safetensors``, ``ip-adapter-plus_sd15.safetensors``, the SDXL ones): its
``image_proj.*`` and ``ip_adapter.*`` keys, split as that function splits them. Pickled ``.bin``
files are refused (they can run code when loaded). The image encoder is a transformers folder of
``CLIPVisionModelWithProjection`` (``models/image_encoder`` of h94/IP-Adapter); its
``preprocessor_config.json`` when there is one, else ``CLIPImageProcessor`` at the encoder's
image size, as ``load_ip_adapter`` makes it. An adapter for another family (its token width is
not the model's cross-attention width) is refused by name.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from engine.errors import GenerationError
from engine.features.controlnet_loading import legacy_model_hash
from engine.features.ip_adapter import IPAdapter, IPRows, is_ip_unit
from engine.features.masks import open_image

log = logging.getLogger(__name__)


def split_ip_adapter(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``image_proj.*`` / ``ip_adapter.*`` keys into the two dicts diffusers' converters take."""
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in parts:
            parts[head][rest] = value
    return parts


class IPAdapters:
    """The model's one IP-Adapter, loaded lazily (the engine worker's thread)."""

    def __init__(self, adapter: str | Path | None, encoder: str | Path | None, unet) -> None:
        self.path = Path(adapter).expanduser() if adapter else None
        self.encoder_dir = Path(encoder).expanduser() if encoder else None
        self.unet = unet
        self._loaded: IPAdapter | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str | None:
        return self.path.stem if self.path else None

    def label(self) -> str:
        """As the A1111 extension names a model: ``name [hash]``."""
        if self.path is None or not self.path.is_file():
            return self.name or ""
        return f"{self.name} [{legacy_model_hash(self.path)}]"

    def job_rows(self, units: tuple, rows: int) -> IPRows | None:
        """The rows of a job with these units (every image takes its reference), or None without one."""
        references = [unit for unit in units if is_ip_unit(unit)]
        if not references:
            return None
        if len(references) > 1:
            raise GenerationError("A job takes one IP-Adapter reference image; leave the others out.")
        reference = references[0]
        image = open_image(reference.image, "reference image").convert("RGB")
        return self.get(reference.model).rows(reference, image, rows)

    def get(self, name: str) -> IPAdapter:
        if self.path is None or self.encoder_dir is None:
            raise GenerationError(
                "This model has no IP-Adapter (model.ip_adapter and model.image_encoder); pick another reference mode."
            )
        if name != self.name:
            raise GenerationError(f"Unknown IP-Adapter {name!r}; this model has {self.name!r}.")
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
        return self._loaded

    def _load(self) -> IPAdapter:
        from safetensors.torch import load_file
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        if self.path.suffix != ".safetensors":
            raise GenerationError(
                f"The IP-Adapter {self.name!r} is a pickled {self.path.suffix} file, which can run code when "
                "loaded; ask the operator for its .safetensors version."
            )
        try:
            parts = split_ip_adapter(load_file(str(self.path)))
            encoder = CLIPVisionModelWithProjection.from_pretrained(
                str(self.encoder_dir), dtype=self.unet.dtype, local_files_only=True
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise GenerationError(
                f"The IP-Adapter {self.name!r} or its image encoder could not be loaded: {exc}"
            ) from exc
        if not parts["image_proj"] or not parts["ip_adapter"]:
            raise GenerationError(f"{self.path.name} has no image_proj.* and ip_adapter.* weights: not an IP-Adapter.")
        width = next(v for k, v in parts["ip_adapter"].items() if k.endswith("to_k_ip.weight")).shape[1]
        if width != self.unet.config.cross_attention_dim:
            raise GenerationError(
                f"The IP-Adapter {self.name!r} is for another model family than this model "
                f"(its tokens are {width} wide, the model's prompts {self.unet.config.cross_attention_dim})."
            )
        if (self.encoder_dir / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(str(self.encoder_dir), local_files_only=True)
        else:
            size = encoder.config.image_size
            processor = CLIPImageProcessor(size=size, crop_size=size)
        adapter = IPAdapter(self.name, self.unet, parts, encoder.to(self.unet.device).eval(), processor)
        log.info("loaded IP-Adapter %s (%s) with the image encoder %s", self.name, self.path, self.encoder_dir)
        return adapter
