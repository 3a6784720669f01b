"""Loading SD 3.5 and Flux.1 single files offline: what model sites carry.

What the file holds is read from its header (:func:`engine.families.checkpoints.flow_contents`):

- a transformer only: BFL's ``flux1-dev.safetensors`` (bare BFL names) and fine-tunes as model
  sites carry them (the same names under ``model.diffusion_model.``, as ComfyUI saves a
  diffusion model), or SD 3.5 Large's ``model.diffusion_model.`` + VAE. Its text encoders,
  tokenizers and VAE come from ``model.encoders``, a diffusers folder or hub id of the family
  (:func:`engine.families.flow_loading.encoders_folder`);
- everything: ComfyUI's all-in-one Flux checkpoint (``vae.``, ``text_encoders.clip_l/t5xxl.``),
  SAI's SD 3.5 Medium with ``text_encoders.clip_l/clip_g/t5xxl.``. The encoders are the file's;
  a part the file lacks comes from ``model.encoders`` when set (SD 3.5 without T5 runs without
  it, as diffusers allows). T5's tokenizer is not in any file: it comes from the config folder
  beside the file or from ``model.encoders``.

Configs, in order: a diffusers-layout folder beside the file with its stem (``foo.safetensors``
+ ``foo/``, as for SD files); else the encoders folder's (``transformer/config.json``...); else
the released model's that we ship in ``engine/data``
(FLUX.1-dev/schnell, SD 3.5 Medium/Large, told apart by block counts and, for Flux, by the
``guidance_in.`` tensor that only dev has). A config from elsewhere than beside the file follows
the file on dev vs schnell (``guidance_embeds``), and its block counts must be the file's. The
scheduler config is the one beside the file, else the shipped one of the variant: dev's dynamic
shift and schnell's static shift of 1 belong to the distillation, which the file tells.

diffusers converts the weights (``from_single_file``); two things it leaves to us: T5 from a file
with ``shared.weight`` only (SAI's, ComfyUI's) keeps ``encoder.embed_tokens`` on the meta device
until ``tie_weights()``, and no weight may be left on the meta device (checked, one line).
An fp8 file loads upcast to the compute dtype (exactly: e4m3 values are bf16/fp32 values);
:mod:`engine.families.flow_storage` stores it back in fp8 when that is asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ModelLoadError
from engine.families.checkpoints import FlowContents
from engine.families.flow_loading import (
    A_FAMILY,
    ENCODER_FILES,
    FlowComponents,
    encoders_folder,
    load_flow_folder,
)
from engine.families.sd.tokenizer import EOS, clip_tokenizer

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
#: The released models whose configs we ship, by (family, what tells them apart in the file).
SHIPPED = {
    ("flux", True): "flux-dev",
    ("flux", False): "flux-schnell",
    ("sd3", 24): "sd3.5-medium",
    ("sd3", 38): "sd3.5-large",
}
#: Block kind in the file -> its count's key in the transformer config.
BLOCK_CONFIG_KEYS = {"double_blocks": "num_layers", "single_blocks": "num_single_layers", "joint_blocks": "num_layers"}
#: Text encoder in the file -> pipeline component (the file's names are ComfyUI's and SAI's).
ENCODER_COMPONENTS = {
    "flux": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
}
#: Padding token of each CLIP tokenizer (CLIP-G's, as open_clip, pads with "!").
CLIP_PADS = {"flux": [EOS], "sd3": [EOS, "!"]}


@dataclass
class FlowFile:
    components: FlowComponents
    config_dir: Path  # where the transformer's config came from
    shipped: bool  # a config we ship (engine/data), not one beside the file or the encoders'


def load_flow_file(path: Path, contents: FlowContents, dtype: torch.dtype, encoders: str = "") -> FlowFile:
    """The model in ``path`` (its header read into ``contents``), its missing parts from ``encoders``."""
    from diffusers import AutoencoderKL

    family = contents.family
    if contents.scaled_fp8:
        raise ModelLoadError(
            f'{path}: a ComfyUI "scaled fp8" file (its fp8 weights come with .scale_weight factors, '
            "which diffusers' converters do not apply); use a plain fp8 (e4m3fn) or bf16 file of the model."
        )
    if not contents.has_everything and not encoders:
        example = "black-forest-labs/FLUX.1-dev" if family == "flux" else "stabilityai/stable-diffusion-3.5-large"
        raise ModelLoadError(
            f"{path}: {A_FAMILY[family]} file without {_lacks(contents)} (it holds {_holds(contents)}); "
            f"set model.encoders to the model's diffusers folder or hub id "
            f'(e.g. model.encoders = "{example}") to take them from there.'
        )
    sidecar = path.with_suffix("")
    sidecar = sidecar if (sidecar / "model_index.json").is_file() else None
    folder = encoders_folder(encoders, family, _wanted(contents)) if encoders else None
    config_dir, shipped = _transformer_config_dir(path, contents, sidecar, folder)
    given = {"transformer": _load_transformer(path, contents, dtype, config_dir, follow_file=sidecar is None)}
    if contents.vae:
        vae_dir = _config_dir(contents, sidecar, folder, "vae")
        given["vae"] = AutoencoderKL.from_single_file(
            str(path), config=str(vae_dir), subfolder="vae", dtype=dtype, local_files_only=True
        )
    if contents.text_encoders:
        components = _file_encoders(path, contents, dtype, sidecar, folder, given)
    else:  # not has_everything, so the encoders folder was given (checked above)
        components = load_flow_folder(folder, family, dtype, **given)
    for name, module in (("transformer", components.transformer), ("VAE", components.vae)):
        _check_no_meta(path, name, module)
    for module in components.text_encoders:
        _check_no_meta(path, type(module).__name__, module)
    components.scheduler_config = _scheduler_config(contents, sidecar)
    return FlowFile(components, config_dir, shipped)


#: The shipped folder whose text encoder, VAE and scheduler configs serve a file of another shape.
FAMILY_DEFAULTS = {"flux": "flux-dev", "sd3": "sd3.5-large"}


def _wanted(contents: FlowContents) -> tuple[str, ...]:
    """The encoders folder's subfolders a file needs: what it lacks, and T5's tokenizer (no file
    has it), so that a hub id is not fetched for the 9.5 GB T5 an all-in-one file carries."""
    if not contents.text_encoders:
        return ENCODER_FILES
    components = ENCODER_COMPONENTS[contents.family]
    lacking = [component for short, component in components.items() if short not in contents.text_encoders]
    tokenizers = [c.replace("text_encoder", "tokenizer") for c in lacking]
    t5_tokenizer = components["t5xxl"].replace("text_encoder", "tokenizer")
    return (*lacking, *sorted({*tokenizers, t5_tokenizer}), *([] if contents.vae else ["vae"]))


def _lacks(contents: FlowContents) -> str:
    encoders = [name for name in contents.missing if name != "vae"]
    parts = [f"its text encoder{'s' if len(encoders) > 1 else ''} ({', '.join(encoders)})"] if encoders else []
    return " and ".join(parts + (["its VAE"] if "vae" in contents.missing else []))


def _holds(contents: FlowContents) -> str:
    return ", ".join(["the transformer"] + (["the VAE"] if contents.vae else []) + list(contents.text_encoders))


def _variant(contents: FlowContents, default: str | None = None) -> str | None:
    key = contents.guidance if contents.family == "flux" else contents.blocks["joint_blocks"]
    return SHIPPED.get((contents.family, key), default)


def _transformer_config_dir(
    path: Path, contents: FlowContents, sidecar: Path | None, folder: Path | None
) -> tuple[Path, bool]:
    if sidecar is not None:
        return sidecar, False
    if folder is not None and (folder / "transformer" / "config.json").is_file():
        return folder, False
    variant = _variant(contents)
    if variant is None:
        counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in contents.blocks.items())
        raise ModelLoadError(
            f"{path}: {A_FAMILY[contents.family]} transformer with {counts}, a shape that none of "
            "the released models we ship configs for has; place its diffusers-layout config folder beside "
            f"it, named {path.with_suffix('').name}, or set model.encoders to a folder with its "
            "transformer/config.json."
        )
    return DATA_DIR / variant, True


def _load_transformer(path: Path, contents: FlowContents, dtype: torch.dtype, config_dir: Path, follow_file: bool):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = json.loads((config_dir / "transformer" / "config.json").read_text())
    wanted = {kind: config.get(BLOCK_CONFIG_KEYS[kind]) for kind in contents.blocks}
    if wanted != contents.blocks:
        raise ModelLoadError(
            f"{path}: its transformer has blocks {contents.blocks}, but the config in {config_dir} has "
            f"{wanted}; place a config folder of the file's shape beside it, named {path.with_suffix('').name}."
        )
    # dev or schnell is the file's, whatever a config from elsewhere says
    overrides = {"guidance_embeds": contents.guidance} if contents.family == "flux" and follow_file else {}
    cls = FluxTransformer2DModel if contents.family == "flux" else SD3Transformer2DModel
    return cls.from_single_file(
        str(path),
        config=str(config_dir),
        subfolder="transformer",
        dtype=dtype,
        local_files_only=True,
        **overrides,
    )


def _file_encoders(
    path: Path, contents: FlowContents, dtype: torch.dtype, sidecar: Path | None, folder: Path | None, given: dict
) -> FlowComponents:
    """The file's own text encoders, with the VAE and encoders it lacks from ``folder``."""
    from diffusers import AutoencoderKL, FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    family = contents.family
    names = ENCODER_COMPONENTS[family]
    given = dict(given)
    if "vae" not in given:  # has_everything is false: the folder was given
        given["vae"] = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype, local_files_only=True)
    for short, component in names.items():
        tokenizer = component.replace("text_encoder", "tokenizer")
        if short in contents.text_encoders:
            continue
        if folder is not None and (folder / component).is_dir():
            cls = (
                T5EncoderModel
                if short == "t5xxl"
                else CLIPTextModel
                if family == "flux"
                else CLIPTextModelWithProjection
            )
            given[component] = cls.from_pretrained(folder, subfolder=component, dtype=dtype, local_files_only=True)
        elif short == "t5xxl" and family == "sd3":  # SD 3.5 runs without T5, as diffusers allows
            given |= {component: None, tokenizer: None}
        else:
            where = f"nor has {folder} a {component} folder" if folder else "and model.encoders is not set"
            raise ModelLoadError(
                f"{path}: the file has no {short} text encoder, {where}; set model.encoders to the "
                "model's diffusers folder or hub id to take it from there."
            )
    for i, pad in enumerate(CLIP_PADS[family]):
        given[f"tokenizer{'' if i == 0 else f'_{i + 1}'}"] = clip_tokenizer(pad)
    t5_tokenizer = names["t5xxl"].replace("text_encoder", "tokenizer")
    if t5_tokenizer not in given:
        given[t5_tokenizer] = _t5_tokenizer(path, [d for d in (sidecar, folder) if d], t5_tokenizer)
    config_dir = _config_dir(contents, sidecar, folder, "text_encoder")
    pipe_class = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    pipe = pipe_class.from_single_file(str(path), config=str(config_dir), dtype=dtype, local_files_only=True, **given)
    if "t5xxl" in contents.text_encoders:
        getattr(pipe, names["t5xxl"]).tie_weights()  # shared.weight only in the file (see the module doc)
    present = [name for name in names.values() if getattr(pipe, name) is not None]
    encoders = [getattr(pipe, name) for name in present]
    tokenizers = [getattr(pipe, name.replace("text_encoder", "tokenizer")) for name in present]
    return FlowComponents(family, pipe.transformer, pipe.vae, encoders, tokenizers, {})


def _config_dir(contents: FlowContents, sidecar: Path | None, folder: Path | None, component: str) -> Path:
    """Where ``component``'s config comes from: beside the file, the encoders folder (when it has
    one: a folder may hold only what the file lacks, such as T5's tokenizer), or what we ship."""
    if sidecar is not None:
        return sidecar
    if folder is not None and (folder / component / "config.json").is_file():
        return folder
    return DATA_DIR / _variant(contents, FAMILY_DEFAULTS[contents.family])


def _t5_tokenizer(path: Path, folders: list[Path], subfolder: str):
    """T5's tokenizer (no file carries it): beside the file, else from the encoders folder."""
    from transformers import T5TokenizerFast

    for folder in folders:
        if (folder / subfolder).is_dir():
            return T5TokenizerFast.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    raise ModelLoadError(
        f"{path}: the file holds T5 but not its tokenizer (no single file does); set model.encoders to the "
        f"model's diffusers folder or hub id, or place a config folder with {subfolder}/ beside the file, "
        f"named {path.with_suffix('').name}."
    )


def _check_no_meta(path: Path, what: str, module: torch.nn.Module) -> None:
    """diffusers leaves a weight the file lacks on the meta device (or at random without accelerate)."""
    missing = [name for name, tensor in module.state_dict().items() if tensor.is_meta]
    if missing:
        raise ModelLoadError(
            f"{path}: the {what} lacks {len(missing)} weight(s) ({', '.join(missing[:3])}...): the file is "
            "incomplete or of another layout; download it again or use the model's diffusers folder."
        )


def _scheduler_config(contents: FlowContents, sidecar: Path | None) -> dict:
    folder = sidecar or DATA_DIR / _variant(contents, FAMILY_DEFAULTS[contents.family])
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
