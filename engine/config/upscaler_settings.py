"""``[upscalers]`` of config.toml: where the upscaler models are and how they are tiled.

Torch-free, so the bot (which names the U buttons' upscaler in its jobs) reads it without the
engine. The models themselves are loaded by :mod:`engine.features.upscalers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.toml_config import ConfigError, check, section

#: The upscaler that needs no model: Pillow's Lanczos filter, named as AUTOMATIC1111 names it.
LANCZOS = "Lanczos"
#: Files spandrel reads (``ModelLoader.load_from_file``), found in ``upscalers.folder``.
MODEL_SUFFIXES = (".pth", ".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class UpscalerSettings:
    folder: str = ""  # upscaler models (ESRGAN, Real-ESRGAN, SwinIR, DAT...), named by file stem; "": none
    default: str = ""  # the U buttons' upscaler; "": the first model in the folder, else Lanczos
    tile: int = 512  # largest tile side in input pixels, so that large images fit in GPU memory
    overlap: int = 32  # input pixels shared by neighbouring tiles, half given to each side

    def default_upscaler(self) -> str:
        """What the U buttons upscale with: ``default``, else the folder's first model, else Lanczos."""
        if self.default:
            return self.default
        return next(iter(model_files(self.folder)), LANCZOS)


def model_files(folder: str | Path) -> dict[str, Path]:
    """The upscaler models of ``folder`` by name (the file stem), sorted; empty without a folder."""
    if not folder:
        return {}
    path = Path(folder).expanduser()
    if not path.is_dir():
        return {}
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())
    found: dict[str, Path] = {}
    for file in files:
        found.setdefault(file.stem, file)  # "x.pth" and "x.safetensors": the first by name
    return found


def parse_upscalers(raw: dict[str, Any]) -> UpscalerSettings:
    """``[upscalers]``, checked: a wrong value stops the start with one line naming the key."""
    settings: UpscalerSettings = section(raw, "upscalers", UpscalerSettings)
    check(
        not settings.folder or not Path(settings.folder).expanduser().is_file(),
        "upscalers.folder",
        settings.folder,
        'a folder of .pth/.safetensors upscaler models (or "" for none), not a file',
    )
    check(32 <= settings.tile <= 4096, "upscalers.tile", settings.tile, "32 to 4096 pixels")
    check(
        0 <= settings.overlap <= settings.tile // 2,
        "upscalers.overlap",
        settings.overlap,
        f"0 to half of upscalers.tile ({settings.tile // 2})",
    )
    if settings.default and settings.default != LANCZOS:
        if not settings.folder:
            raise ConfigError(
                f"upscalers.default = {settings.default!r}: set upscalers.folder to the folder holding it"
            )
        names = model_files(settings.folder)
        # A folder that is not on this machine (a bot without an engine) is checked by the workers.
        check(
            settings.default in names or not Path(settings.folder).expanduser().is_dir(),
            "upscalers.default",
            settings.default,
            f"a model file name without its extension from {settings.folder} "
            f"({', '.join(names) or 'no .pth/.safetensors files there'}), or {LANCZOS}",
        )
    return settings
