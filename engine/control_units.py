"""A job's ControlNet units, as AUTOMATIC1111's ControlNet extension (sd-webui-controlnet) has them.

Torch-free: the bot builds :class:`ControlUnit` values at the Discord boundary, the queue stores
them in the ``jobs.control_units`` column (:func:`units_to_column` / :func:`units_from_column`:
JSON, the images as base64), the engine runs them (:mod:`engine.features.controlnet`) and the
PNG's infotext writes them as the extension does (:meth:`ControlUnit.infotext`), so that
A1111's PNG Info restores them.

The options are the extension's own (``internal_controlnet/args.py``): weight, guidance start and
end as fractions of the steps, control mode and resize mode, with the extension's labels as values.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from pathlib import Path

#: AUTOMATIC1111's control modes (scripts/enums.py ``ControlMode``). "My prompt is more important"
#: scales the residuals down block by block (its soft injection); "ControlNet is more important"
#: does that and gives them to the prompt's rows only, not the negative prompt's (its CFG injection).
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
#: AUTOMATIC1111's resize modes (``ResizeMode``): stretch, crop to fill (its default), pad to fit.
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
DEFAULT_RESIZE_MODE = "Crop and Resize"
#: Units a job may use (the extension's default ``control_net_unit_count`` is 3).
MAX_CONTROL_UNITS = 3
MAX_CONTROL_WEIGHT = 2.0  # the extension's slider

#: Preprocessors (the extension's ``module``) made by image operations, and their A1111 names.
#: Model-based annotators are listed by :mod:`engine.features.annotators` when installed.
PREPROCESSORS = {"none": "none", "canny": "canny", "tile": "tile_resample", "blur": "blur_gaussian"}
#: A unit with one of these modules is a reference through the model's IP-Adapter (the extension
#: runs IP-Adapters as units too), not a ControlNet: "subject" into every cross-attention layer,
#: "style" into InstantStyle's style block only (engine.features.ip_adapter).
IP_ADAPTER_MODULES = {"ip-adapter_clip": "subject", "ip-adapter_style": "style"}
#: A1111's default processor resolution and thresholds per preprocessor (its sliders' defaults).
PROCESSOR_DEFAULTS: dict[str, tuple[int, float, float]] = {
    "none": (-1, -1, -1),
    "canny": (512, 100, 200),
    "tile": (512, 1, -1),
    "blur": (512, 9, -1),
}


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit of a job: a ControlNet, its image and how it steers the rows."""

    model: str  # a ControlNet of ``controlnet.folder`` by name
    image: bytes  # the member's image (PNG/JPEG/WebP bytes), checked at the Discord boundary
    module: str = "none"  # the preprocessor: a key of PREPROCESSORS or an installed annotator
    weight: float = 1.0
    guidance_start: float = 0.0  # fraction of the steps where the unit starts
    guidance_end: float = 1.0  # ... and where it stops (A1111: steps i with i / steps <= end)
    control_mode: str = CONTROL_MODES[0]
    resize_mode: str = DEFAULT_RESIZE_MODE

    def refusal(self) -> str | None:
        """Why this unit cannot run as asked (one line saying what to do), or None."""
        if not 0 <= self.weight <= MAX_CONTROL_WEIGHT:
            return f"A ControlNet weight must be 0 to {MAX_CONTROL_WEIGHT:g}."
        if not 0 <= self.guidance_start <= self.guidance_end <= 1:
            return "A ControlNet's guidance start and end are fractions of the steps, 0 to 1, start first."
        if self.control_mode not in CONTROL_MODES:
            return f"Unknown control mode {self.control_mode!r}; use one of {', '.join(CONTROL_MODES)}."
        if self.resize_mode not in RESIZE_MODES:
            return f"Unknown resize mode {self.resize_mode!r}; use one of {', '.join(RESIZE_MODES)}."
        return None

    def infotext(self, model_label: str) -> str:
        """The unit as the extension writes it (``ControlNetUnit.serialize``): its infotext fields
        as ``Field Name: str(value)``, joined by ", " (A1111 quotes the whole value)."""
        resolution, threshold_a, threshold_b = PROCESSOR_DEFAULTS.get(self.module, (512, -1, -1))
        fields = {
            "Module": PREPROCESSORS.get(self.module, self.module),
            "Model": model_label,
            "Weight": float(self.weight),
            "Resize Mode": self.resize_mode,
            "Processor Res": resolution,
            "Threshold A": float(threshold_a),
            "Threshold B": float(threshold_b),
            "Guidance Start": float(self.guidance_start),
            "Guidance End": float(self.guidance_end),
            "Pixel Perfect": False,
            "Control Mode": self.control_mode,
        }
        return ", ".join(f"{name}: {value}" for name, value in fields.items())


def units_to_column(units: tuple[ControlUnit, ...]) -> str | None:
    """The ``jobs.control_units`` value: JSON, each image as base64; None for no units."""
    if not units:
        return None
    return json.dumps([asdict(unit) | {"image": base64.b64encode(unit.image).decode()} for unit in units])


def units_from_column(value: str | None) -> tuple[ControlUnit, ...]:
    if not value:
        return ()
    return tuple(ControlUnit(**(item | {"image": base64.b64decode(item["image"])})) for item in json.loads(value))


def controlnet_names(folder: str | Path) -> dict[str, Path]:
    """The folder's ControlNets by name (a file's stem or a subfolder's name), sorted."""
    if not folder or not Path(folder).is_dir():
        return {}
    found = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_dir() and (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model.*")):
            found[path.name] = path
        elif path.suffix in (".safetensors", ".pth", ".ckpt", ".pt") and path.is_file():
            found.setdefault(path.stem, path)
    return found
