"""``[model]`` and ``[models.<name>]`` of ``config.toml``: each model's source and its own settings.

Parsed once into frozen :class:`ModelSettings` by :func:`parse_models` (called by
:func:`engine.config.settings.parse_engine_sections`); every check names the key, the value and what
is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.config.toml_config import ConfigError, check, section
from engine.families import FAMILIES as FAMILY_TRAITS
from engine.params import SAMPLER_NAMES


@dataclass(frozen=True)
class ModelSettings:
    source: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    name: str = ""
    family: str = "auto"
    prediction_type: str = "auto"
    embeddings_dir: str = ""  # textual-inversion embeddings, found in prompts by file name
    lora_dir: str = ""  # LoRA files, used in prompts as <lora:NAME:WEIGHT>
    controlnet_dir: str = ""  # ControlNets for this model's family (folders or .safetensors), by name
    ip_adapter: str = ""  # an IP-Adapter .safetensors for this model's family (references' style/subject)
    image_encoder: str = ""  # its CLIP image encoder (a CLIPVisionModelWithProjection folder)
    image_guidance: float = 1.5  # an InstructPix2Pix model's image guidance (A1111's Image CFG Scale)
    clip_skip: int = 1  # the model's default CLIP skip (anime models want 2); a member may choose another
    # This model's own defaults, before its family's and [generation]'s (0 or "": not set).
    default_steps: int = 0
    default_guidance: float = 0.0
    default_sampler: str = ""
    # SD 3.5 / Flux.1 single files without their text encoders and VAE take them from here: a
    # diffusers folder or hub id of the family (engine/families/flow_files.py).
    encoders: str = ""
    # How the denoising network (and T5) are stored: "auto" (an fp8 file stays fp8, else
    # engine.dtype), "float8_e4m3fn" (upcast per layer), "compute" (engine.dtype even for an fp8 file).
    weights: str = "auto"

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        return Path(self.source.rstrip("/")).stem or self.source


FAMILIES = ("auto", *FAMILY_TRAITS)
#: ``model.weights`` and ``engine.text_encoders`` (engine/families/flow_storage.py).
WEIGHT_STORAGES = ("auto", "float8_e4m3fn", "compute")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")


def parse_models(raw: dict[str, Any]) -> tuple[ModelSettings, tuple[ModelSettings, ...]]:
    """The default model and the others.

    ``[model]`` is the default, named by its display name; each ``[models.<name>]`` adds one model
    called ``<name>``. Without ``[model]`` the first ``[models.<name>]`` is the default; with
    neither, the default ``[model]`` (SD 1.5 from the hub).
    """
    tables = raw.get("models", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError('[models] must hold one table per model, e.g. [models.anime] with source = "..."')
    named = []
    for name, table in tables.items():
        check(
            0 < len(name) <= 100 and name.strip() == name and "\n" not in name,
            "models",
            name,
            "model names are 1 to 100 characters, without leading or trailing spaces",
        )
        check(
            "name" not in table,
            f"models.{name}.name",
            table.get("name"),
            "the table's own name is the model's name; remove this key",
        )
        model = section({f"models.{name}": table}, f"models.{name}", ModelSettings)
        named.append(replace(model, name=name))
    if "model" in raw or not named:
        default, others = section(raw, "model", ModelSettings), named
    else:
        default, others = named[0], named[1:]
    seen: set[str] = set()
    for model in (default, *others):
        key = "model" if model is default and "model" in raw else f"models.{model.display_name}"
        check(
            model.display_name not in seen,
            key,
            model.display_name,
            "each model needs its own name (the default [model] is named by model.name or its file name)",
        )
        seen.add(model.display_name)
        _check_model(key, model)
    return default, tuple(others)


def _check_model(key: str, model: ModelSettings) -> None:
    check(
        bool(model.source.strip()),
        f"{key}.source",
        model.source,
        "give a hub id, a diffusers folder or a .safetensors file",
    )
    check(model.family in FAMILIES, f"{key}.family", model.family, f"one of {', '.join(FAMILIES)}")
    check(
        model.prediction_type in PREDICTION_TYPES,
        f"{key}.prediction_type",
        model.prediction_type,
        f"one of {', '.join(PREDICTION_TYPES)}",
    )
    check(
        isinstance(model.clip_skip, int) and 1 <= model.clip_skip <= 12,
        f"{key}.clip_skip",
        model.clip_skip,
        "1 to 12 (1: the text encoder's last layer; anime models often want 2)",
    )
    check(
        isinstance(model.default_steps, int) and 0 <= model.default_steps <= 500,
        f"{key}.default_steps",
        model.default_steps,
        "0 (the family's or [generation]'s) to 500 (and at most generation.max_steps)",
    )
    check(0 <= model.default_guidance <= 30, f"{key}.default_guidance", model.default_guidance, "0 (not set) to 30")
    check(
        model.default_sampler in ("", *SAMPLER_NAMES),
        f"{key}.default_sampler",
        model.default_sampler,
        f'"" (not set) or one of {", ".join(SAMPLER_NAMES)}',
    )
    check(
        model.weights in WEIGHT_STORAGES,
        f"{key}.weights",
        model.weights,
        f"one of {', '.join(WEIGHT_STORAGES)} (float8_e4m3fn: SD 3.5 and Flux.1 only)",
    )
    check(
        not model.encoders or not Path(model.encoders).expanduser().is_file(),
        f"{key}.encoders",
        model.encoders,
        'a diffusers folder or hub id of the model (e.g. "black-forest-labs/FLUX.1-dev"), not a file; "" for none',
    )
    check(
        not model.ip_adapter or Path(model.ip_adapter).expanduser().suffix == ".safetensors",
        f"{key}.ip_adapter",
        model.ip_adapter,
        'an IP-Adapter .safetensors file (e.g. ip-adapter_sd15.safetensors), or "" for none',
    )
    check(
        bool(model.ip_adapter) == bool(model.image_encoder),
        f"{key}.image_encoder",
        model.image_encoder,
        "the CLIP image encoder's folder, set together with ip_adapter (both or neither)",
    )
    check(
        1.0 <= model.image_guidance <= 5.0,
        f"{key}.image_guidance",
        model.image_guidance,
        "1 to 5 (InstructPix2Pix models only; 1.5 is diffusers' default)",
    )
    for folder in ("embeddings_dir", "lora_dir", "controlnet_dir", "image_encoder"):
        value = getattr(model, folder)
        check(
            not value or not Path(value).expanduser().is_file(),
            f"{key}.{folder}",
            value,
            'a folder (or "" for none), not a file',
        )
