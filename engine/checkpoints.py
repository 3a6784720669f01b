"""What a single-file checkpoint is, read from its ``.safetensors`` header without loading it:
its family, whether it is complete, and whether its UNet is one the engine can run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from engine.errors import ModelLoadError
from engine.inpaint import INPAINT_CHANNELS, PLAIN_CHANNELS

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
OTHER_CHANNELS = {
    8: "an InstructPix2Pix (image editing) checkpoint: its UNet takes the image to edit as 4 extra input channels"
}
#: SDXL refiners have only the second (open_clip bigG) text encoder, as embedder 0.
REFINER_PREFIX = "conditioner.embedders.0.model."
REFINER_MESSAGE = (
    "an SDXL refiner: it only finishes images that an SDXL base model has begun, and the engine "
    "does not run refiners; use an SDXL base checkpoint instead."
)


def detect_family(path: str | Path, header: dict | None = None) -> str:
    """``sd1``/``sd2``/``sdxl`` from a single file's tensor names (header only, no weights read)."""
    keys = list(header if header is not None else read_safetensors_header(path))
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
            "conditioner.embedders.). LoRA, VAE-only and other model types are not supported."
        )
    return family


def check_unet_channels(where: Path, channels: int) -> int:
    """The UNet's input channels if the engine can run it (4 or 9), else a ModelLoadError saying what it is."""
    if channels in (PLAIN_CHANNELS, INPAINT_CHANNELS):
        return channels
    what = OTHER_CHANNELS.get(channels, f"a model whose UNet takes {channels} input channels")
    raise ModelLoadError(
        f"{where}: {what}. The engine runs plain Stable Diffusion checkpoints (4 channels) and "
        "inpainting checkpoints (9 channels) only."
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
