"""Cheap progress previews: latents -> RGB by a fixed linear map, no VAE.

Each latent channel contributes a fixed colour (the "cheap approximation" AUTOMATIC1111 offers,
factors fitted by the community for SD1/SD2, SDXL, and SD 3.5's and Flux's 16-channel latents, as
ComfyUI's ``latent_formats`` has them). A preview is the size of the
latent (1/8 of the image per side), which is all a progress message needs. The engine thread only
copies the previewed rows' latents to the host (all of a step's in one copy, which nobody waits
for: :mod:`engine.batching.readback`); the colour map and the PNG are made on the host, in the finisher's
pool, where a few kilobytes of arithmetic cost less than a kernel launch would.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

from engine.families import FAMILIES


def latents_to_rgb(latents: Tensor, family: str) -> Tensor:
    """``[C, h, w]`` scaled latents -> ``[h, w, 3]`` uint8 on the CPU."""
    latents = latents.cpu()  # already there in the engine (a Readback's host copy): no copy then
    traits = FAMILIES.get(family, FAMILIES["sd1"])
    factors, bias = torch.tensor(traits.preview_factors), traits.preview_bias
    channels = min(latents.shape[0], factors.shape[0])
    rgb = torch.einsum("chw,cr->hwr", latents[:channels].float(), factors[:channels])
    if bias is not None:
        rgb = rgb + torch.tensor(bias)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def preview_png(latents: Tensor, family: str) -> bytes:
    """A small PNG of one image's predicted clean latents."""
    buffer = io.BytesIO()
    Image.fromarray(latents_to_rgb(latents, family).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
