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

# Rows: latent channels; columns: R, G, B.
SD_FACTORS = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
SDXL_FACTORS = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_BIAS = [0.1084, -0.0175, -0.0011]
# The 16-channel latents of SD 3.5 and Flux.1 (ComfyUI's latent_formats, in the scaled latents' space).
SD3_FACTORS = [
    [-0.0922, -0.0175, 0.0749],
    [0.0311, 0.0633, 0.0954],
    [0.1994, 0.0927, 0.0458],
    [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496],
    [-0.0006, 0.1104, 0.0309],
    [0.0978, 0.0306, 0.0427],
    [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669],
    [-0.0488, 0.0130, -0.0268],
    [0.0922, 0.0988, 0.0951],
    [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895],
    [-0.0069, -0.0030, -0.0810],
    [-0.0596, -0.0465, -0.0293],
    [-0.1448, -0.1463, -0.1189],
]
SD3_BIAS = [0.2394, 0.2135, 0.1925]
FLUX_FACTORS = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
]
FLUX_BIAS = [-0.0329, -0.0718, -0.0851]
#: Family -> (factors, bias); SD 1.x and 2.x share their VAE's factors and have no bias.
PREVIEW_FACTORS = {
    "sdxl": (SDXL_FACTORS, SDXL_BIAS),
    "sd3": (SD3_FACTORS, SD3_BIAS),
    "flux": (FLUX_FACTORS, FLUX_BIAS),
}


def latents_to_rgb(latents: Tensor, family: str) -> Tensor:
    """``[C, h, w]`` scaled latents -> ``[h, w, 3]`` uint8 on the CPU."""
    latents = latents.cpu()  # already there in the engine (a Readback's host copy): no copy then
    factors, bias = PREVIEW_FACTORS.get(family, (SD_FACTORS, None))
    factors = torch.tensor(factors)
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
