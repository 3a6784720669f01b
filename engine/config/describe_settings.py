"""``[describe]`` of config.toml: the image-to-text models behind /describe.

Torch-free, so the bot (which offers /describe only where a captioner or a tagger is configured)
reads it without the engine. The models themselves are loaded by :mod:`engine.features.describe`
on the first job; here a source is only checked to be a folder (a tagger's with its two files) or
a hub id, so a mistyped path stops the start.
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
    # A WD14 booru tagger (ONNX via onnxruntime, the `tagger` extra), for anime models: a folder
    # holding model.onnx and selected_tags.csv as SmilingWolf's repositories ship them, or a hub id
    # (SmilingWolf/wd-swinv2-tagger-v3). "": none.
    tagger: str = ""

    @property
    def offered(self) -> bool:
        """Whether /describe has a model to run."""
        return bool(self.captioner or self.tagger)


def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def _is_tagger(source: str) -> bool:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return (folder / "model.onnx").is_file() and (folder / "selected_tags.csv").is_file()
    return _is_hub_id(source)


def parse_describe(raw: dict[str, Any]) -> DescribeSettings:
    """``[describe]``, checked: a wrong value stops the start with one line naming the key."""
    settings: DescribeSettings = section(raw, "describe", DescribeSettings)
    source = settings.captioner
    check(
        not source or Path(source).expanduser().is_dir() or _is_hub_id(source),
        "describe.captioner",
        source,
        'a folder saved with save_pretrained, a Hugging Face Hub id (owner/name), or "" for none',
    )
    check(
        not settings.tagger or _is_tagger(settings.tagger),
        "describe.tagger",
        settings.tagger,
        "a folder holding a WD14 tagger's model.onnx and selected_tags.csv, a Hugging Face Hub id "
        '(SmilingWolf/wd-swinv2-tagger-v3), or "" for none',
    )
    return settings
