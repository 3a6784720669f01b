"""A configured model's family without loading it (torch-free, for the bot's process).

The bot offers each model's own defaults and refuses what does not apply to it at the Discord
boundary, before a job is queued; so it must know each configured model's family before any
model is loaded (the engine may run in another process, or on another machine). ``family`` in a
model's table says it; with ``auto`` it is read here from what the source holds: a diffusers
folder's ``model_index.json`` (and, for Flux, whether its transformer has a guidance embedding),
or a single file's tensor names (:func:`engine.families.checkpoints.detect_family`). A hub id is not
fetched for this: its family is unknown until the engine loads it (None).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.families import family_of_pipeline, guidance_kind


def source_family(source: str, family: str = "auto") -> tuple[str, str] | None:
    """``(family, guidance)`` of a configured model (``guidance``: engine.families.GUIDANCE_KINDS),
    or None when it cannot be told without loading it (a hub id, a missing path)."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = _folder_family(path)
    elif path.is_file() and path.suffix == ".safetensors":
        found = _file_family(path)
    else:
        found = None
    if family != "auto":  # the configuration says so (the engine checks it against the file)
        guidance = found[1] if found and found[0] == family else guidance_kind(family, True)
        return family, guidance
    return found


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _folder_family(folder: Path) -> tuple[str, str] | None:
    family = family_of_pipeline(_read(folder / "model_index.json").get("_class_name", ""))
    if family == "sd1" and _read(folder / "text_encoder" / "config.json").get("hidden_act") == "gelu":
        family = "sd2"  # SD 2.x's open_clip encoder
    if family is None:
        return None
    embeds = _read(folder / "transformer" / "config.json").get("guidance_embeds", True)
    return family, guidance_kind(family, bool(embeds))


def _file_family(path: Path) -> tuple[str, str] | None:
    from engine.errors import ModelLoadError
    from engine.families.checkpoints import detect_family, read_safetensors_header

    try:
        header = read_safetensors_header(path)
        family = detect_family(path, header)
    except ModelLoadError:
        return None  # the engine says what is wrong with it when it loads it
    embeds = any(key.startswith(("guidance_in.", "model.diffusion_model.guidance_in.")) for key in header)
    return family, guidance_kind(family, embeds)
