"""Upscaler models (ESRGAN, Real-ESRGAN, SwinIR, DAT...) from a folder, through spandrel.

spandrel (the library ComfyUI and Forge load these with) reads a ``.pth``/``.safetensors``
state dict, recognises its architecture and hyperparameters, and gives an
``ImageModelDescriptor`` that maps a ``[1, 3, H, W]`` image in ``[0, 1]`` to one ``scale`` times
as large. What we add around it:

- only super-resolution models are used: a face restorer, a 1x denoiser or an inpainting model
  is refused when it is first loaded, with a log line and a job error naming it;
- models load lazily, by name (the file stem), and at most :data:`KEEP_LOADED` stay on the device;
- tiles, so a large image fits in memory: the image is cut into a grid of cells, each cell is
  run with ``overlap / 2`` pixels of its neighbours around it, and only the cell's own part of
  the output is kept. A model that looks no further than that around a pixel (as small ones
  do) gives exactly the untiled image, and large ones differ only in faint, far-reaching
  context: no seams to blend away. spandrel pads each tile to the model's size requirements
  itself. A model that tiles internally (``ModelTiling.INTERNAL``) gets the whole image.
- a requested scale other than the model's: as AUTOMATIC1111 does, the model runs again (at
  most :data:`MAX_PASSES` times) until the image is at least that large, then Lanczos resizes
  it to the exact size.

:meth:`Upscalers.upscale` also takes the model-free ``"Lanczos"``, so a caller (the U buttons,
hires fix) asks for any upscaler the same way.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from engine.config.toml_config import ConfigError
from engine.config.upscaler_settings import LANCZOS, UpscalerSettings, model_files
from engine.errors import GenerationError
from engine.serving.memory import free_memory
from engine.torch_builds import torchvision_importable

log = logging.getLogger(__name__)

#: Upscaler models kept on the device at once (each is tens of MB); the least recently used leaves.
KEEP_LOADED = 2
#: Most model passes for one scale (a 2x model asked for 8x runs three times), as AUTOMATIC1111.
MAX_PASSES = 3


class Upscalers:
    """The upscaler models of one folder, run on one device (the engine worker's thread only)."""

    def __init__(
        self,
        folder: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        tile: int = 512,
        overlap: int = 32,
    ) -> None:
        self.folder = str(folder)
        self.device, self.dtype = torch.device(device), dtype
        self.tile, self.overlap = tile, overlap
        self._loaded: OrderedDict[str, object] = OrderedDict()  # name -> ImageModelDescriptor, LRU first
        self._refused: dict[Path, GenerationError] = {}  # files found unusable, not read again
        self._lock = threading.Lock()

    @classmethod
    def configured(cls, settings: UpscalerSettings, device: torch.device, dtype: torch.dtype) -> Upscalers:
        """``[upscalers]`` on the engine's device; its default model is loaded now, so a missing or
        unusable one stops the start with one line (ConfigError)."""
        upscalers = cls(settings.folder, device, dtype, tile=settings.tile, overlap=settings.overlap)
        if settings.folder and not Path(settings.folder).expanduser().is_dir():
            raise ConfigError(f"upscalers.folder = {settings.folder!r}: no such folder on this machine")
        default = settings.default_upscaler()
        try:
            upscalers.scale_of(default)
        except GenerationError as e:
            raise ConfigError(f"upscalers.default = {default!r}: {e}") from None
        return upscalers

    def names(self) -> list[str]:
        """The model names (file stems) in the folder, sorted, less those refused when loaded;
        ``"Lanczos"`` is always usable too."""
        return [name for name, path in model_files(self.folder).items() if path not in self._refused]

    def scale_of(self, name: str) -> int:
        """The model's own scale (4 for a 4x ESRGAN); 1 for Lanczos, which has none."""
        return 1 if name == LANCZOS else self._model(name).scale

    @torch.inference_mode()
    def upscale(self, image: Image.Image, name: str, scale: float) -> Image.Image:
        """``image`` made ``scale`` times as large (rounded to whole pixels) by upscaler ``name``."""
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.convert("RGB")
        if name != LANCZOS:
            model = self._model(name)
            for _ in range(MAX_PASSES):
                if image.width >= size[0] and image.height >= size[1]:
                    break
                image = self._run(model, image)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def upscale_to(self, image: Image.Image, name: str, size: tuple[int, int]) -> Image.Image:
        """``image`` upscaled to cover ``size``, then center-cropped to it (a job's multiple-of-8 size)."""
        scale = max(size[0] / image.width, size[1] / image.height)
        return ImageOps.fit(self.upscale(image, name, scale), size, Image.Resampling.LANCZOS)

    # ------------------------------------------------------------------ models

    def _model(self, name: str):
        """The loaded model ``name`` (loaded now if need be); GenerationError when there is none or
        it is not an image super-resolution model."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        files = model_files(self.folder)
        if name not in files:
            have = ", ".join([LANCZOS, *files])
            raise GenerationError(f"No upscaler named {name!r} here; available: {have}.")
        if files[name] in self._refused:
            raise self._refused[files[name]]
        try:
            model = self._load(name, files[name])
        except GenerationError as e:
            self._refused[files[name]] = e
            raise
        with self._lock:
            while len(self._loaded) >= KEEP_LOADED:
                dropped, _ = self._loaded.popitem(last=False)
                log.info("unloading upscaler %s to make room", dropped)
            self._loaded[name] = model
        return model

    def _load(self, name: str, path: Path):
        try:
            torchvision_importable()  # spandrel imports torchvision (see engine/torch_builds.py)
            import spandrel  # here, not at the top: it imports every architecture it knows
        except (ImportError, RuntimeError, OSError) as e:
            raise GenerationError(
                f"Upscaler models need spandrel, which could not be imported ({type(e).__name__}: {e}); "
                "reinstall the bot's requirements (README, Set up)."
            ) from e
        try:
            with torch.inference_mode(False):
                descriptor = spandrel.ModelLoader().load_from_file(path)
        except spandrel.UnsupportedModelError:
            log.warning("upscaler %s (%s): not a model architecture spandrel knows; skipped", name, path)
            raise GenerationError(f"Upscaler {name!r} is not a model spandrel can load.") from None
        except Exception as e:
            log.warning("upscaler %s (%s) could not be read", name, path, exc_info=True)
            raise GenerationError(f"Upscaler {name!r} could not be read ({type(e).__name__}).") from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
            purpose = getattr(descriptor, "purpose", "?")
            log.warning(
                "upscaler %s (%s) is a %s model (%s, %dx), not image super-resolution; refused",
                name,
                path,
                purpose,
                descriptor.architecture.name,
                descriptor.scale,
            )
            raise GenerationError(
                f"Upscaler {name!r} is a {purpose} model ({descriptor.architecture.name}, {descriptor.scale}x), "
                "not an image upscaler."
            )
        dtype = self._dtype_for(descriptor)
        free_memory()  # what an unloaded model left in the allocator's cache
        log.info("loaded upscaler %s: %s %dx, %s", name, descriptor.architecture.name, descriptor.scale, dtype)
        return descriptor.to(self.device, dtype).eval()

    def _dtype_for(self, descriptor) -> torch.dtype:
        """The engine's dtype where the architecture supports it, else float32."""
        if self.dtype == torch.float16 and descriptor.supports_half:
            return torch.float16
        if self.dtype == torch.bfloat16 and descriptor.supports_bfloat16:
            return torch.bfloat16
        return torch.float32

    # ------------------------------------------------------------------ running one

    def _run(self, model, image: Image.Image) -> Image.Image:
        """One pass of ``model`` over ``image``, tile by tile."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
        pixels = pixels.to(self.device, model.dtype) / 255
        out = upscale_tiled(model, pixels, self.tile, self.overlap)
        data = (out[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(data)


def cells(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Cut ``[0, length)`` into cells of at most ``tile - overlap``: per cell ``(start, end)`` of the
    cell and ``(start, end)`` of its tile, the cell widened by ``overlap // 2`` on each inner side."""
    if length <= tile:
        return [(0, length, 0, length)]
    margin = overlap // 2
    step = tile - 2 * margin
    count = math.ceil(length / step)
    bounds = [round(i * length / count) for i in range(count + 1)]  # even cells: no sliver at the end
    return [(a, b, max(0, a - margin), min(length, b + margin)) for a, b in zip(bounds, bounds[1:], strict=False)]


def upscale_tiled(model, pixels: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """``model`` over ``[1, C, H, W]`` pixels in tiles of at most ``tile`` (see the module doc)."""
    from spandrel import ModelTiling

    _, _, height, width = pixels.shape
    if model.tiling == ModelTiling.INTERNAL or (height <= tile and width <= tile):
        return model(pixels)
    scale = model.scale
    out = torch.empty(1, model.output_channels, height * scale, width * scale, dtype=pixels.dtype, device=pixels.device)
    for y0, y1, ty0, ty1 in cells(height, tile, overlap):
        for x0, x1, tx0, tx1 in cells(width, tile, overlap):
            piece = model(pixels[:, :, ty0:ty1, tx0:tx1])
            top, left = (y0 - ty0) * scale, (x0 - tx0) * scale
            out[:, :, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = piece[
                :, :, top : top + (y1 - y0) * scale, left : left + (x1 - x0) * scale
            ]
    return out
