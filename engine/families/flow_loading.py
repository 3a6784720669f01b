"""Loading SD 3.5 and Flux.1 diffusers folders (and hub ids, once downloaded) without the network.

A folder's ``model_index.json`` names its pipeline class: ``FluxPipeline`` or
``StableDiffusion3Pipeline``. Its components are loaded with that pipeline's ``from_pretrained``
(``local_files_only``), so the shapes, tokenizers and scheduler config are the folder's own. An
SD 3.5 folder without ``text_encoder_3`` runs without T5, as diffusers allows; ``use_t5=False``
leaves a folder's T5 out on purpose (it is 4.7 B parameters; prompts then lose T5's reading).

The same folder (or hub id) can be a single file's *encoders* (``model.encoders``): a Flux
transformer file, as BFL and model sites ship it, takes its text encoders, tokenizers and VAE
from it (:mod:`engine.families.flow_files`). A hub id given as encoders is downloaded without its
transformer's weights (:data:`ENCODER_FILES`): the file replaces them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ModelLoadError
from engine.families import FAMILIES, family_of_pipeline

FAMILY_LABELS = {name: traits.label for name, traits in FAMILIES.items() if traits.flow}
#: "a Flux.1 model", "an SD 3.5 model".
A_FAMILY = {"flux": "a Flux.1", "sd3": "an SD 3.5"}
#: What an encoders hub id is downloaded for: everything but the transformer's weights (a file
#: that holds some parts asks for the rest only: :func:`encoders_folder`'s ``parts``).
ENCODER_FILES = (
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "vae",
)
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class FlowComponents:
    family: str
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler_config: dict


def folder_pipeline_family(folder: Path) -> str | None:
    """``flux``/``sd3`` for a flow family's diffusers folder, None for anything else."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    family = family_of_pipeline(index.get("_class_name", ""))
    return family if family is not None and FAMILIES[family].flow else None


def load_flow_folder(folder: Path, family: str, dtype: torch.dtype, use_t5: bool = True, **given) -> FlowComponents:
    """Every component of a Flux or SD 3.5 diffusers folder, in ``dtype``; ``given`` components
    (a single file's transformer, VAE...) are used instead of the folder's."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if family == "flux":
        pipe = FluxPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **given)
        encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
        if pipe.text_encoder_2 is None:
            raise ModelLoadError(f"{folder}: a Flux model needs its T5 text encoder (text_encoder_2).")
    else:
        skip_t5 = not use_t5 or not (folder / "text_encoder_3").is_dir()
        extra = {"text_encoder_3": None, "tokenizer_3": None} if skip_t5 else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **(given | extra))
        encoders = [pipe.text_encoder, pipe.text_encoder_2] + ([pipe.text_encoder_3] if not skip_t5 else [])
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2] + ([pipe.tokenizer_3] if not skip_t5 else [])
    return FlowComponents(family, pipe.transformer, pipe.vae, encoders, tokenizers, dict(pipe.scheduler.config))


def encoders_folder(
    source: str, family: str, parts: tuple[str, ...] = ENCODER_FILES, setting: str = "model.encoders"
) -> Path:
    """The diffusers folder that ``setting`` names (a local folder, or a hub id fetched without
    its transformer's weights: its index, transformer config and subfolders ``parts`` only),
    checked to hold a ``family`` pipeline."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif HUB_ID.fullmatch(source):
        folder = _download_encoders(source, parts, setting)
    else:
        raise ModelLoadError(
            f"{setting} = {source!r}: no such folder; give a diffusers folder of {A_FAMILY[family]} "
            "model or a Hugging Face Hub id such as black-forest-labs/FLUX.1-dev."
        )
    found = folder_pipeline_family(folder)
    if found != family:
        what = f"{A_FAMILY[found]} model" if found else "not an SD 3.5 or Flux.1 diffusers folder"
        raise ModelLoadError(
            f"{setting} = {source!r}: {folder} is {what} (no model_index.json naming its pipeline), "
            f"but the file is {A_FAMILY[family]} model; give that family's diffusers folder or hub id."
        )
    return folder


def _download_encoders(repo_id: str, parts: tuple[str, ...], setting: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "transformer/config.json", *(f"{part}/*" for part in parts)]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # hub errors come in many types; all mean "could not fetch"
        raise ModelLoadError(
            f"{setting} = {repo_id!r}: could not fetch its text encoders and VAE from the Hugging Face "
            f"Hub ({type(exc).__name__}: {exc}). If this machine is offline, download the model's "
            f"diffusers folder elsewhere and set {setting} to it."
        ) from exc
