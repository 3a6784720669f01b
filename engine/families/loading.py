"""Load a Stable Diffusion checkpoint (SD 1.x, SD 2.x, SDXL) into a :class:`LoadedModel`.

``source`` may be

1. a diffusers folder (has ``model_index.json``), e.g. from ``save_pretrained``;
2. a single ``.safetensors`` file as people download them (CompVis/Stability key layout).
   The family is read from tensor-name prefixes (:data:`FAMILY_PREFIXES`), then diffusers'
   ``from_single_file`` builds the components from a local diffusers-layout config folder, so
   loading never touches the network. The folder is, in order: a folder next to the file with
   the same name minus ``.safetensors`` (for checkpoints with unusual shapes, and our tiny test
   models), else the one we ship in ``engine/data/<family>`` (SD 1.5, SD 2.1 768-v, SDXL base 1.0);
3. a Hugging Face Hub id (``owner/name``), downloaded into the hub cache with progress bars.

SD 3.5 and Flux.1 come the same three ways; their single files (a transformer alone, or with its
VAE and text encoders) are read by :mod:`engine.families.flow_files`, their missing parts taken
from ``encoders`` (``model.encoders``). Where their weights live (float8 storage, text encoders
on the CPU) is :mod:`engine.families.flow_storage`'s.

The UNet's first convolution tells what kind of checkpoint it is (:func:`check_unet_channels`):
4 input channels is a plain model, 9 an inpainting model (latents, mask, masked image; see
:mod:`engine.features.inpaint`), 8 an InstructPix2Pix model (latents, the image to edit; see
:mod:`engine.features.instruct_edit`), read from the folder's UNet config or the single file's header (a single
file's UNet is then built with that many channels, whatever the config folder says). Checkpoints
the engine cannot run are refused by name: SDXL refiners. A
single file with a ``v_pred`` tensor is a v-prediction model (as ComfyUI and Forge read it).

SD 2.x comes in two kinds that have the same tensor names: 768-v (``v_prediction``) and 512-base
(``epsilon``). Nothing in the file tells them apart, so a single SD2 file follows the shipped
SD 2.1 768-v config (``v_prediction``, 768 px) unless ``prediction_type="epsilon"`` is passed
(then the default size is 512); an SD 2.x *inpainting* file (9 channels) is taken as the 512 px
epsilon model that Stability released. Folders and hub models carry their own scheduler config.

All tokenizers are the CLIP tokenizer (:mod:`engine.families.sd.tokenizer`), checked to have 49,408 tokens.
Every failure we can name is raised as :class:`~engine.errors.ModelLoadError` with the path and
what was expected.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.torch_builds import torchvision_importable

# transformers warns on import when torchvision is missing (we need none of its image processors);
# every `python -m engine` / `python -m bot` run would print it. Silence that one module.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
torchvision_importable()  # before diffusers and transformers look for it (see engine/torch_builds.py)

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.config.settings import EngineSettings, ModelSettings, resolve_device
from engine.errors import ModelLoadError
from engine.families import FAMILIES as FAMILY_TRAITS
from engine.families import guidance_kind
from engine.families.checkpoints import (
    CONV_IN_KEY,
    REFINER_MESSAGE,
    FlowContents,
    check_unet_channels,
    detect_family,
    flow_contents,
    read_safetensors_header,
)
from engine.families.flow_files import load_flow_file
from engine.families.flow_loading import folder_pipeline_family, load_flow_folder
from engine.families.flow_storage import TEXT_ENCODER_PLACES as PLACES
from engine.families.flow_storage import WEIGHT_STORAGES, store_in_fp8, stores_fp8
from engine.families.load_tools import download_pipeline, load_errors, progress_bars, read_json
from engine.families.sd.tokenizer import EOS, VOCAB_SIZE, clip_tokenizer
from engine.features.inpaint import INPAINT_CHANNELS, PLAIN_CHANNELS
from engine.hashes import HashCache, shared_cache
from engine.sampling.schedules import alphas_cumprod_from_config
from engine.types import ModelInfo

DATA_DIR = Path(__file__).parents[1] / "data"
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
#: Padding token per tokenizer: open_clip encoders (SD2, SDXL's second) pad with "!".
PAD_TOKENS = {"sd1": [EOS], "sd2": ["!"], "sdxl": [EOS, "!"]}
PREDICTION_TYPES = ("epsilon", "v_prediction")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class LoadedModel:
    """Everything the sampler needs, on ``device`` in ``dtype``, in eval mode, no grads."""

    info: ModelInfo
    unet: UNet2DConditionModel  # the denoising network: a UNet, or SD 3.5's and Flux's transformer
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel | CLIPTextModelWithProjection]  # 1 for SD1/SD2, 2 for SDXL
    tokenizers: list[CLIPTokenizer]
    alphas_cumprod: torch.Tensor | None  # float64 on CPU, from the checkpoint's scheduler betas (None: flow)
    device: torch.device
    dtype: torch.dtype
    vae_scaling_factor: float
    scheduler_config: dict = field(default_factory=dict)  # the flow families read their shift here
    embeddings_dir: Path | None = None  # textual-inversion embeddings for this model's prompts
    lora_dir: Path | None = None  # LoRA files for ``<lora:NAME:WEIGHT>`` in this model's prompts
    controlnet_dir: Path | None = None  # ControlNets for this model's jobs' units, by name
    ip_adapter: Path | None = None  # the IP-Adapter .safetensors for references (engine.features.ip_loading)
    image_encoder: Path | None = None  # its CLIP image encoder's folder
    image_guidance: float = 1.5  # an InstructPix2Pix model's image guidance (engine.features.instruct_edit)
    lora_slots: int = 4  # engine.lora_slots and engine.lora_max_rank (engine.features.lora_slots)
    lora_max_rank: int = 64


def load_model(
    source: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    family: str = "auto",
    name: str = "",
    progress: bool = True,
    prediction_type: str | None = None,
    hashes: HashCache | None = None,
    encoders: str = "",
    weights: str = "auto",
    text_encoders: str = "device",
) -> LoadedModel:
    """Load ``source`` (folder, ``.safetensors`` or hub id); see the module docstring.

    ``family`` ("auto", "sd1", "sd2", "sdxl", "sd3", "flux") must agree with what the checkpoint
    holds when given. ``prediction_type`` ("epsilon" / "v_prediction") overrides the scheduler
    config's. A single file's A1111 model hash comes from ``hashes`` (default: the process's cache).
    A flow single file's missing parts come from ``encoders`` (a diffusers folder or hub id);
    ``weights`` and ``text_encoders`` are ``model.weights`` and ``engine.text_encoders``.
    """
    if family not in ("auto", *FAMILIES):
        raise ModelLoadError(f"model family {family!r} is unknown: use auto, {', '.join(FAMILIES)}.")
    for key, value, allowed in (("weights", weights, WEIGHT_STORAGES), ("text_encoders", text_encoders, PLACES)):
        if value not in allowed:
            raise ModelLoadError(f"{key} {value!r} is unknown: use {', '.join(allowed)}.")
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ModelLoadError(f"prediction_type {prediction_type!r} is unknown: use epsilon or v_prediction.")
    path = Path(source).expanduser()
    with progress_bars(progress):
        if path.is_dir() and (flow := folder_pipeline_family(path)):
            parts = _load_flow_folder(path, family, flow, dtype)
        elif path.is_dir():
            parts = _load_folder(path, family, dtype)
        elif path.is_file():
            parts = _load_single_file(path, family, dtype, prediction_type, encoders)
            parts.file_hash = (hashes or shared_cache()).short_hash(path)
        elif HUB_ID.fullmatch(source) and not source.endswith(".safetensors"):
            folder = download_pipeline(source)
            flow = folder_pipeline_family(folder)
            parts = _load_flow_folder(folder, family, flow, dtype) if flow else _load_folder(folder, family, dtype)
        else:
            raise ModelLoadError(
                f"{source}: no such file or folder (expected a diffusers folder, "
                "a .safetensors checkpoint or a Hugging Face Hub id owner/name)."
            )
    if stores_fp8(weights, parts.fp8_file):
        if not FAMILY_TRAITS[parts.family].flow:
            raise ModelLoadError(
                f"{source}: float8 weight storage (model.weights) is for SD 3.5 and Flux.1 models; "
                f'this is a {parts.family} model: set model.weights = "auto".'
            )
        store_in_fp8(parts.unet, parts.text_encoders, dtype)  # before the move: only fp8 travels
        parts.fp8_storage = True
    parts.encoders_on_cpu = text_encoders == "cpu"
    return _assemble(parts, source, name, torch.device(device), dtype, prediction_type)


def load_configured_model(model: ModelSettings, engine: EngineSettings, *, progress: bool = True) -> LoadedModel:
    """Load a configured model (``[model]`` or ``[models.<name>]``) on ``[engine]``'s device and dtype."""
    device, dtype = resolve_device(engine)
    loaded = load_model(
        model.source,
        device=device,
        dtype=dtype,
        family=model.family,
        name=model.display_name,
        progress=progress,
        prediction_type=None if model.prediction_type == "auto" else model.prediction_type,
        encoders=model.encoders,
        weights=model.weights,
        text_encoders=engine.text_encoders,
    )
    loaded.embeddings_dir = Path(model.embeddings_dir).expanduser() if model.embeddings_dir else None
    loaded.lora_dir = Path(model.lora_dir).expanduser() if model.lora_dir else None
    loaded.controlnet_dir = Path(model.controlnet_dir).expanduser() if model.controlnet_dir else None
    loaded.ip_adapter = Path(model.ip_adapter).expanduser() if model.ip_adapter else None
    loaded.image_encoder = Path(model.image_encoder).expanduser() if model.image_encoder else None
    loaded.image_guidance = model.image_guidance
    loaded.lora_slots, loaded.lora_max_rank = engine.lora_slots, engine.lora_max_rank
    return loaded


# ---------------------------------------------------------------------------- sources


@dataclass
class _Parts:
    """What a source yields before it is moved to the device and described."""

    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    config_dir: Path
    shipped_config: bool = False
    file_hash: str | None = None
    fp8_file: bool = False  # a single file with float8 weights
    fp8_storage: bool = False  # stored in float8, upcast per layer (engine.families.flow_storage)
    encoders_on_cpu: bool = False  # engine.text_encoders = "cpu" (the flow families only)


def _load_folder(folder: Path, family: str, dtype: torch.dtype) -> _Parts:
    """A diffusers folder: each component from its subfolder."""
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder}: not a diffusers model folder (no model_index.json).")
    if (folder / "text_encoder_2").is_dir() and not (folder / "text_encoder").is_dir():
        raise ModelLoadError(f"{folder}: {REFINER_MESSAGE}")
    detected = _folder_family(folder)
    check_unet_channels(folder, read_json(folder / "unet" / "config.json").get("in_channels", PLAIN_CHANNELS))
    _check_family(folder, family, detected)
    encoder_names = ["text_encoder", "text_encoder_2"][: 2 if detected == "sdxl" else 1]
    with load_errors(folder):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        encoders = [
            (CLIPTextModelWithProjection if sub.endswith("_2") else CLIPTextModel).from_pretrained(
                folder, subfolder=sub, dtype=dtype
            )
            for sub in encoder_names
        ]
        tokenizers = [
            CLIPTokenizer.from_pretrained(folder, subfolder=sub.replace("text_encoder", "tokenizer"))
            for sub in encoder_names
        ]
    return _Parts(detected, unet, vae, encoders, tokenizers, _scheduler_config(folder), folder)


def _load_flow_folder(folder: Path, family: str, detected: str, dtype: torch.dtype) -> _Parts:
    """An SD 3.5 or Flux.1 diffusers folder (engine.families.flow_loading)."""
    _check_family(folder, family, detected)
    with load_errors(folder):
        loaded = load_flow_folder(folder, detected, dtype)
    encoders, tokenizers = loaded.text_encoders, loaded.tokenizers
    return _Parts(detected, loaded.transformer, loaded.vae, encoders, tokenizers, loaded.scheduler_config, folder)


def _folder_family(folder: Path) -> str:
    """SDXL has a second text encoder; SD2's open_clip encoder uses gelu where SD1's uses quick_gelu."""
    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / sub).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{folder}: missing subfolder(s) {', '.join(missing)}; expected a "
            "Stable Diffusion pipeline saved with save_pretrained."
        )
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    text_config = read_json(folder / "text_encoder" / "config.json")
    return "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"


def _load_single_file(
    path: Path, family: str, dtype: torch.dtype, prediction_type: str | None, encoders: str = ""
) -> _Parts:
    """An LDM-layout ``.safetensors``: detect the family, convert with a local config folder."""
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{path}: only .safetensors checkpoints are supported (pickled .ckpt/.pt "
            "files can run code when loaded); download the .safetensors version."
        )
    header = read_safetensors_header(path)
    if contents := flow_contents(header):
        return _load_flow_file(path, family, contents, dtype, encoders)
    detected = detect_family(path, header)
    _check_family(path, family, detected)
    channels = check_unet_channels(path, header[CONV_IN_KEY]["shape"][1] if CONV_IN_KEY in header else PLAIN_CHANNELS)
    sidecar = path.with_suffix("")
    shipped = not (sidecar / "model_index.json").is_file()
    config_dir = DATA_DIR / detected if shipped else sidecar
    tokenizers = [clip_tokenizer(pad) for pad in PAD_TOKENS[detected]]
    pipeline_class = StableDiffusionXLPipeline if detected == "sdxl" else StableDiffusionPipeline
    extra = {"tokenizer": tokenizers[0]} | ({"tokenizer_2": tokenizers[1]} if detected == "sdxl" else {})
    hint = f"with the {detected} config in {config_dir}"
    if shipped:
        hint += (
            f" (a checkpoint of another shape needs its own diffusers-layout config folder "
            f"next to it, named {sidecar.name})"
        )
    with load_errors(path, hint):
        if channels != read_json(config_dir / "unet" / "config.json").get("in_channels", PLAIN_CHANNELS):
            # An inpainting file next to a plain model's config (the shipped ones are plain).
            extra["unet"] = UNet2DConditionModel.from_single_file(
                str(path),
                config=str(config_dir),
                subfolder="unet",
                in_channels=channels,
                torch_dtype=dtype,
                local_files_only=True,
            )
        pipe = pipeline_class.from_single_file(
            str(path), config=str(config_dir), torch_dtype=dtype, local_files_only=True, **extra
        )
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if detected == "sdxl" else [])
    scheduler_config = _scheduler_config(config_dir)
    if "v_pred" in header:  # a marker tensor that v-prediction SDXL fine-tunes carry
        scheduler_config = scheduler_config | {"prediction_type": "v_prediction"}
    elif shipped and detected == "sd2" and channels == INPAINT_CHANNELS:
        # SD 2.x inpainting was trained at 512 px with epsilon, unlike the shipped 768-v config.
        scheduler_config = scheduler_config | {"prediction_type": "epsilon"}
    return _Parts(detected, pipe.unet, pipe.vae, encoders, tokenizers, scheduler_config, config_dir, shipped)


def _load_flow_file(path: Path, family: str, contents: FlowContents, dtype: torch.dtype, encoders: str) -> _Parts:
    """An SD 3.5 or Flux.1 single file (engine.families.flow_files)."""
    _check_family(path, family, contents.family)
    with load_errors(path, f"as a {contents.family} single file"):
        loaded = load_flow_file(path, contents, dtype, encoders)
    c = loaded.components
    return _Parts(
        contents.family,
        c.transformer,
        c.vae,
        c.text_encoders,
        c.tokenizers,
        c.scheduler_config,
        loaded.config_dir,
        loaded.shipped,
        fp8_file=contents.fp8,
    )


# ---------------------------------------------------------------------------- checks


def _check_family(where: Path, wanted: str, detected: str) -> None:
    if wanted not in ("auto", detected):
        raise ModelLoadError(
            f"{where}: configured as family {wanted} but it holds a {detected} model; set family to {detected} or auto."
        )


def _check_tokenizer(tokenizer: CLIPTokenizer, where: Path) -> None:
    # A missing tokenizer folder raises nothing in transformers: it yields a 2-token tokenizer.
    if len(tokenizer) != VOCAB_SIZE:
        raise ModelLoadError(
            f"{where}: tokenizer has {len(tokenizer)} tokens, expected the "
            f"{VOCAB_SIZE}-token CLIP vocabulary (is a tokenizer folder missing?)."
        )


# ---------------------------------------------------------------------------- assembly


def _scheduler_config(folder: Path) -> dict:
    return read_json(folder / "scheduler" / "scheduler_config.json")


def _assemble(
    parts: _Parts, source: str, name: str, device: torch.device, dtype: torch.dtype, prediction_type: str | None
) -> LoadedModel:
    """Check the tokenizers, move everything to the device, and describe the model."""
    flow = FAMILY_TRAITS[parts.family].flow
    for tokenizer in parts.tokenizers:
        if isinstance(tokenizer, CLIPTokenizer):  # T5's comes with its model, whatever its size
            _check_tokenizer(tokenizer, parts.config_dir)
    prediction_type = "flow" if flow else prediction_type or parts.scheduler_config.get("prediction_type", "epsilon")
    if not flow and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"{parts.config_dir}: scheduler prediction_type {prediction_type!r} "
            "is not supported (expected epsilon or v_prediction)."
        )
    encoder_device = torch.device("cpu") if flow and parts.encoders_on_cpu else device  # SD's CLIPs are small
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        # Already in ``dtype`` (loaded with it, which keeps diffusers' fp32-only parts in fp32).
        place = encoder_device if any(module is e for e in parts.text_encoders) else device
        module.to(place).eval().requires_grad_(False)
    latent_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    # Flux's transformer has no native size; both flow families were trained at 1024 px.
    default_size = parts.unet.config.get("sample_size", 1024 // latent_scale) * latent_scale
    if parts.shipped_config and parts.family == "sd2" and prediction_type == "epsilon":
        default_size = 512  # an SD 2.x 512-base checkpoint, not the shipped 768-v one
    info = ModelInfo(
        name=name or Path(source.rstrip("/")).stem or source,
        family=parts.family,
        prediction_type=prediction_type,
        default_size=default_size,
        latent_scale=latent_scale,
        file_hash=parts.file_hash,
        inpainting=not flow and parts.unet.config.in_channels == INPAINT_CHANNELS,
        guidance=guidance_kind(parts.family, bool(parts.unet.config.get("guidance_embeds", True))),
        extra={
            "source": source,
            "config": str(parts.config_dir),
            "weights": "float8_e4m3fn" if parts.fp8_storage else str(dtype).removeprefix("torch."),
        },
    )
    return LoadedModel(
        info=info,
        unet=parts.unet,
        vae=parts.vae,
        text_encoders=parts.text_encoders,
        tokenizers=parts.tokenizers,
        alphas_cumprod=None if flow else alphas_cumprod_from_config(parts.scheduler_config),
        scheduler_config=parts.scheduler_config,
        device=device,
        dtype=dtype,
        vae_scaling_factor=float(parts.vae.config.scaling_factor),
    )
