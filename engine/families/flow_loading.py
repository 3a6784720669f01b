"""Loading SD 3.5 and Flux.1 diffusers folders (and hub ids, once downloaded) without the network.

A folder's ``model_index.json`` names its pipeline class: ``FluxPipeline`` or
``StableDiffusion3Pipeline``. Its components are loaded with that pipeline's ``from_pretrained``
(``local_files_only``), so the shapes, tokenizers and scheduler config are the folder's own. An
SD 3.5 folder without ``text_encoder_3`` runs without T5, as diffusers allows; ``use_t5=False``
leaves a folder's T5 out on purpose (it is 4.7 B parameters; prompts then lose T5's reading).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ModelLoadError

#: model_index.json ``_class_name`` -> family.
PIPELINE_FAMILIES = {
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
}


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
    return PIPELINE_FAMILIES.get(index.get("_class_name", ""))


def load_flow_folder(folder: Path, family: str, dtype: torch.dtype, use_t5: bool = True) -> FlowComponents:
    """Every component of a Flux or SD 3.5 diffusers folder, in ``dtype``."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if family == "flux":
        pipe = FluxPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
        if pipe.text_encoder_2 is None:
            raise ModelLoadError(f"{folder}: a Flux model needs its T5 text encoder (text_encoder_2).")
    else:
        skip_t5 = not use_t5 or not (folder / "text_encoder_3").is_dir()
        extra = {"text_encoder_3": None, "tokenizer_3": None} if skip_t5 else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **extra)
        encoders = [pipe.text_encoder, pipe.text_encoder_2] + ([pipe.text_encoder_3] if not skip_t5 else [])
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2] + ([pipe.tokenizer_3] if not skip_t5 else [])
    return FlowComponents(family, pipe.transformer, pipe.vae, encoders, tokenizers, dict(pipe.scheduler.config))
