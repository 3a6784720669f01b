"""``[describe]`` of config.toml: the image-to-text model behind /describe.

Torch-free, so the bot (which offers /describe only where a captioner is configured) reads it
without the engine. The model itself is loaded by :mod:`engine.features.describe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.toml_config import check, section


@dataclass(frozen=True)
class DescribeSettings:
    # A transformers image-to-text model (BLIP's BlipForConditionalGeneration, or another that
    # AutoModelForImageTextToText loads): a folder saved with save_pretrained, or a hub id.
    # "": /describe is not offered.
    captioner: str = ""


def parse_describe(raw: dict[str, Any]) -> DescribeSettings:
    """``[describe]``, checked: a wrong value stops the start with one line naming the key."""
    settings: DescribeSettings = section(raw, "describe", DescribeSettings)
    source = settings.captioner
    check(
        not source
        or Path(source).expanduser().is_dir()
        or (source.count("/") == 1 and not source.startswith((".", "/", "~"))),
        "describe.captioner",
        source,
        'a folder saved with save_pretrained, a Hugging Face Hub id (owner/name), or "" for none',
    )
    return settings
