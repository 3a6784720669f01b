"""Cheap progress previews: latents -> RGB by a fixed linear map, no VAE.

Each latent channel contributes a fixed colour (the "cheap approximation" AUTOMATIC1111 offers,
factors fitted by the community for SD1/SD2 and SDXL latents). A preview is the size of the
latent (1/8 of the image per side), which is all a progress message needs. The engine thread only
copies the previewed rows' latents to the host (all of a step's in one copy, which nobody waits
for: :mod:`engine.readback`); the colour map and the PNG are made on the host, in the finisher's
pool, where a few kilobytes of arithmetic cost less than a kernel launch would.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

# Rows: latent channels; columns: R, G, B.
SD_FACTORS = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
SDXL_FACTORS = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_BIAS = [0.1084, -0.0175, -0.0011]


def latents_to_rgb(latents: Tensor, family: str) -> Tensor:
    """``[C, h, w]`` scaled latents -> ``[h, w, 3]`` uint8 on the CPU."""
    latents = latents.cpu()  # already there in the engine (a Readback's host copy): no copy then
    factors = torch.tensor(SDXL_FACTORS if family == "sdxl" else SD_FACTORS)
    channels = min(latents.shape[0], factors.shape[0])
    rgb = torch.einsum("chw,cr->hwr", latents[:channels].float(), factors[:channels])
    if family == "sdxl":
        rgb = rgb + torch.tensor(SDXL_BIAS)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def preview_png(latents: Tensor, family: str) -> bytes:
    """A small PNG of one image's predicted clean latents."""
    buffer = io.BytesIO()
    Image.fromarray(latents_to_rgb(latents, family).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
