"""What a single-file checkpoint is, read from its ``.safetensors`` header without loading it
(torch-free): its family, whether it is complete, and whether its UNet is one the engine can run.

The flow families are told by their transformer's block names, as diffusers'
``infer_diffusers_model_type`` and ComfyUI do: Flux.1's ``double_blocks.``/``single_blocks.``
(BFL's names, bare as in flux1-dev.safetensors or under ``model.diffusion_model.`` as ComfyUI
saves them), SD 3.5's ``joint_blocks.`` under ``model.diffusion_model.``. What else such a file
holds (VAE, text encoders) is read by :func:`flow_contents`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError

#: A tensor-name prefix that only that family's text encoder uses (checked in this order).
FAMILY_PREFIXES = (
    ("conditioner.embedders.1.model.", "sdxl"),
    ("cond_stage_model.model.", "sd2"),
    ("cond_stage_model.transformer.", "sd1"),
)
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
#: The UNet's first convolution (LDM layout): its input channels tell plain from inpainting.
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
#: What other UNet input widths are, for the refusal message.
OTHER_CHANNELS: dict[int, str] = {}
#: InstructPix2Pix: the image to edit as 4 extra input channels (engine.features.instruct_edit).
INSTRUCT_CHANNELS = 8
#: SDXL refiners have only the second (open_clip bigG) text encoder, as embedder 0.
REFINER_PREFIX = "conditioner.embedders.0.model."
#: Where a flow transformer's tensors start: Flux files come bare (BFL) or under UNET_PREFIX.
FLUX_PREFIXES = ("", UNET_PREFIX)
#: Prefixes of what a flow single file may carry besides its transformer (ComfyUI's and SAI's names).
FLOW_VAE_PREFIXES = ("vae.", VAE_PREFIX)
FLOW_TEXT_ENCODERS = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
REFINER_MESSAGE = (
    "an SDXL refiner: it only finishes images that an SDXL base model has begun, and the engine "
    "does not run refiners; use an SDXL base checkpoint instead."
)


def detect_family(path: str | Path, header: dict | None = None) -> str:
    """``sd1``/``sd2``/``sdxl``/``sd3``/``flux`` from a single file's tensor names (header only,
    no weights read)."""
    keys = list(header if header is not None else read_safetensors_header(path))
    flow = flow_family(keys)
    if flow:
        return flow
    if any(k.startswith(REFINER_PREFIX) for k in keys) and not any(
        k.startswith("conditioner.embedders.1.") for k in keys
    ):
        raise ModelLoadError(f"{path}: {REFINER_MESSAGE}")
    family = next((fam for prefix, fam in FAMILY_PREFIXES if any(k.startswith(prefix) for k in keys)), None)
    missing = [
        what
        for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"))
        if not any(k.startswith(prefix) for k in keys)
    ]
    if family is None or missing:
        lacking = ", ".join(missing + ([] if family else ["text encoder"]))
        raise ModelLoadError(
            f"{path}: not a full Stable Diffusion 1.x/2.x/XL checkpoint (no {lacking} tensors; "
            f"expected names starting with {UNET_PREFIX}, {VAE_PREFIX} and cond_stage_model. or "
            "conditioner.embedders.), nor an SD 3.5 or Flux.1 one (joint_blocks., double_blocks.). "
            "LoRA, VAE-only and other model types are not supported."
        )
    return family


def flow_family(keys: list[str]) -> str | None:
    """``flux`` or ``sd3`` when these tensor names hold a flow transformer, else None (a LoRA
    in BFL's names, as XLabs' ``double_blocks.0.processor.qkv_lora1.*``, is not a model)."""
    if any("lora" in k for k in keys):
        return None
    for prefix in FLUX_PREFIXES:
        if any(k.startswith(prefix + "double_blocks.") for k in keys) and any(
            k.startswith(prefix + "single_blocks.") for k in keys
        ):
            return "flux"
    if any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in keys):
        return "sd3"
    return None


@dataclass(frozen=True)
class FlowContents:
    """What a Flux or SD 3.5 single file holds, from its header."""

    family: str
    prefix: str  # where the transformer's names start ("" or "model.diffusion_model.")
    blocks: dict[str, int]  # block kind -> count: Flux's double/single, SD 3.5's joint
    guidance: bool  # Flux dev's guidance embedding (``guidance_in.``); schnell has none
    vae: bool
    text_encoders: tuple[str, ...]  # of "clip_l", "clip_g", "t5xxl", in that order
    fp8: bool  # float8_e4m3fn weights, as Comfy's and Forge's fp8 files
    #: ComfyUI's "scaled fp8": each fp8 weight has a ``.scale_weight`` (or ``.weight_scale``) to
    #: multiply it by, which diffusers' converters do not apply.
    scaled_fp8: bool = False

    @property
    def missing(self) -> tuple[str, ...]:
        """What the family needs that the file lacks: "vae" and text encoders (SD 3.5's T5 is optional)."""
        wanted = {"flux": ("clip_l", "t5xxl"), "sd3": ("clip_l", "clip_g")}[self.family]
        return (*([] if self.vae else ["vae"]), *(name for name in wanted if name not in self.text_encoders))

    @property
    def has_everything(self) -> bool:
        return not self.missing


def flow_contents(header: dict) -> FlowContents | None:
    """What a flow single file holds, or None when it is not one."""
    keys = list(header)
    family = flow_family(keys)
    if family is None:
        return None
    prefix = UNET_PREFIX
    if family == "flux" and not any(k.startswith(UNET_PREFIX + "double_blocks.") for k in keys):
        prefix = ""
    kinds = ("double_blocks", "single_blocks") if family == "flux" else ("joint_blocks",)
    blocks = {}
    for kind in kinds:
        start = f"{prefix}{kind}."
        blocks[kind] = len({k[len(start) :].split(".", 1)[0] for k in keys if k.startswith(start)})
    return FlowContents(
        family=family,
        prefix=prefix,
        blocks=blocks,
        guidance=any(k.startswith(prefix + "guidance_in.") for k in keys),
        vae=any(k.startswith(p) for p in FLOW_VAE_PREFIXES for k in keys),
        text_encoders=tuple(
            name for name, start in FLOW_TEXT_ENCODERS.items() if any(k.startswith(start) for k in keys)
        ),
        fp8=any(t.get("dtype") == "F8_E4M3" for t in header.values()),
        scaled_fp8=any(k.endswith((".scale_weight", ".weight_scale", "scaled_fp8")) for k in keys),
    )


def check_unet_channels(where: Path, channels: int) -> int:
    """The UNet's input channels if the engine can run it (4, 8 or 9), else a ModelLoadError saying what it is."""
    from engine.features.inpaint import INPAINT_CHANNELS, PLAIN_CHANNELS  # torch: only once a UNet is being loaded

    if channels in (PLAIN_CHANNELS, INPAINT_CHANNELS, INSTRUCT_CHANNELS):
        return channels
    what = OTHER_CHANNELS.get(channels, f"a model whose UNet takes {channels} input channels")
    raise ModelLoadError(
        f"{where}: {what}. The engine runs plain Stable Diffusion checkpoints (4 channels) and "
        "inpainting (9 channels) and InstructPix2Pix (8 channels) checkpoints only."
    )


def read_safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names from a ``.safetensors`` header, checking that the file is complete."""
    return list(read_safetensors_header(path))


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """Tensor name -> ``{"dtype", "shape", "data_offsets"}`` from a ``.safetensors`` header,
    checking that the file is complete.

    Layout: 8-byte little-endian header length, JSON header, then the tensor bytes; the header's
    largest ``data_offsets`` end must fit in the file, or the download was cut short.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise ModelLoadError(
                f"{path}: damaged or truncated .safetensors file (bad header length); download it again."
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise ModelLoadError(f"{path}: damaged .safetensors header (not valid JSON); download it again.") from exc
    header.pop("__metadata__", None)
    data_end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise ModelLoadError(
            f"{path}: truncated: the header expects {8 + header_len + data_end:,} bytes "
            f"but the file has {size:,}; download it again."
        )
    return header
