"""What the model loaders share: library errors as one ModelLoadError, the libraries' progress
bars switched off and on together, JSON configs read with a clear error, hub downloads."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from engine.torch_builds import torchvision_importable

# Before diffusers and transformers look for torchvision (engine/torch_builds.py): any module that
# imports these tools first (a ControlNet's loader, say) must not find a torchvision that cannot load.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
torchvision_importable()

from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from huggingface_hub import utils as hub_utils  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from engine.errors import ModelLoadError  # noqa: E402


def download_pipeline(repo_id: str) -> Path:
    """Fetch a hub model's diffusers files (safetensors, no safety checker) into the hub cache."""
    try:
        return Path(
            DiffusionPipeline.download(
                repo_id, use_safetensors=True, safety_checker=None, feature_extractor=None, image_encoder=None
            )
        )
    except Exception as exc:  # hub errors come in many types; all mean "could not fetch"
        raise ModelLoadError(
            f"{repo_id}: could not fetch this model from the Hugging Face Hub ({type(exc).__name__}: "
            f"{exc}). If this machine is offline, download it elsewhere and set model.source to "
            "the local folder or .safetensors file."
        ) from exc


@contextlib.contextmanager
def load_errors(where: Path, expected: str = "") -> Iterator[None]:
    """Turn whatever diffusers/transformers/safetensors raise into a ModelLoadError."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:  # the libraries raise OSError, ValueError, RuntimeError, their own...
        detail = f" {expected}" if expected else ""
        raise ModelLoadError(f"{where}: could not load the model{detail}: {type(exc).__name__}: {exc}") from exc


#: (is shown, hide, show) for each library that draws progress bars while loading.
_PROGRESS_SWITCHES = (
    (
        lambda: not hub_utils.are_progress_bars_disabled(),
        hub_utils.disable_progress_bars,
        hub_utils.enable_progress_bars,
    ),
    (
        diffusers_logging.is_progress_bar_enabled,
        diffusers_logging.disable_progress_bar,
        diffusers_logging.enable_progress_bar,
    ),
    (
        transformers_logging.is_progress_bar_enabled,
        transformers_logging.disable_progress_bar,
        transformers_logging.enable_progress_bar,
    ),
)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show (or hide) the download and loading bars of hub, diffusers and transformers."""
    hidden = [] if enabled else [(hide, show) for shown, hide, show in _PROGRESS_SWITCHES if shown()]
    for hide, _ in hidden:
        hide()
    try:
        yield
    finally:
        for _, show in hidden:
            show()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: missing or not valid JSON ({exc}).") from exc
