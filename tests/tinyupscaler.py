"""Tiny random-weight upscaler models, written as real ``.pth``/``.safetensors`` state dicts.

They are Real-ESRGAN's compact network (``SRVGGNetCompact``, spandrel's "Compact" architecture)
built from spandrel's own class with a few channels and layers, so spandrel recognises them from
their keys exactly as it does the released ``realesr-general-x4v3.pth``. Two 3x3 convolutions
(``num_conv=1`` plus the first and last) see 3 pixels around each input pixel: a tile with more
context than that gives exactly the untiled image.

(Not a test module: the upscaler tests import it.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Input pixels each output pixel depends on, around it, for the models made here (num_conv=1).
RECEPTIVE_RADIUS = 3


def import_spandrel():
    """spandrel, imported as the engine imports it (see engine/torch_builds.py)."""
    from engine.torch_builds import torchvision_importable

    torchvision_importable()
    import spandrel

    return spandrel


def compact(scale: int = 2, *, num_feat: int = 8, num_conv: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a random-weight Real-ESRGAN compact network of ``scale`` (1: a "restoration" model)."""
    import torch

    spandrel = import_spandrel()
    from spandrel.architectures.Compact import Compact

    assert spandrel.__version__
    torch.manual_seed(seed)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("bias") or tensor.ndim == 1:  # biases and PReLU slopes, else all alike
                tensor.uniform_(-0.1, 0.3)
    return {name: tensor.clone().contiguous() for name, tensor in net.state_dict().items()}


def save_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    import torch

    torch.save(state, path)
    return path


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def upscaler_folder(folder: Path) -> Path:
    """A folder as a server would have it: a 2x model (``.pth``), a 4x one (``.safetensors``), a
    1x "restoration" model and a LoRA-like file spandrel does not know (both to be refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_pth(compact(2, seed=1), folder / "tiny-2x.pth")
    save_safetensors(compact(4, seed=2), folder / "tiny-4x.safetensors")
    save_pth(compact(1, seed=3), folder / "denoise-1x.pth")
    lora = {"lora_unet_down.lora_down.weight": compact(2)["body.0.weight"].flatten(1)}
    save_safetensors(lora, folder / "not-an-upscaler.safetensors")
    return folder
