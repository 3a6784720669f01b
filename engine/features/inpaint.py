"""Masked jobs in latent space, for 4-channel UNets and for 9-channel inpainting UNets.

- Any checkpoint (4 input channels): at every step the rows' latents outside the mask are put
  back to the init image's latents noised to the row's next sigma with the job's own initial
  noise (:class:`LatentBlend`, applied by :meth:`engine.batching.batch.Batch.step`), as diffusers'
  ``StableDiffusionInpaintPipeline`` does with ``init_latents_proper``; the last step (sigma 0)
  leaves exactly the init latents there.
- An inpainting checkpoint (9 input channels: latents, mask, masked image latents) is told
  where to paint instead: every row carries ``[mask, latents of the image with the masked area
  grey]`` as extra input channels (``Conditioning.image``). Rows of plain txt2img/img2img jobs
  get an all-white mask and a grey image, as diffusers and AUTOMATIC1111 give them.

The pixel side (reading, feathering, cropping, pasting back) is :mod:`engine.features.masks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from engine.features.masks import InpaintPlan
from engine.sampling.samplers import rows

#: UNet input channels we can run: plain latents, or latents + mask + masked image latents.
PLAIN_CHANNELS, INPAINT_CHANNELS = 4, 9


@dataclass(frozen=True)
class LatentBlend:
    """Per-row: where to repaint (``mask`` 1), and what stays elsewhere (``init + noise * sigma``)."""

    mask: Tensor  # [rows, 1, h, w] float32, 1 = repaint, 0 = keep the init image
    init_latents: Tensor  # [rows, C, h, w] float32
    noise: Tensor  # [rows, C, h, w] float32, the job's initial noise (unit variance)
    #: A rectified-flow model's rows (engine.families.flow): kept = (1 - sigma) init + sigma noise.
    flow: bool = False

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``x`` with its kept area set to the init latents noised to each row's ``sigma``."""
        init = self.init_latents * (1 - rows(sigma)) if self.flow else self.init_latents
        kept = init + self.noise * rows(sigma)
        return kept + self.mask * (x - kept)

    @staticmethod
    def cat(
        parts: list[tuple[LatentBlend | None, int]], latent_shape: tuple[int, ...], device: torch.device
    ) -> LatentBlend | None:
        """The batch's blend from its jobs' (blend, rows); rows without one repaint everything.
        None when no job has a mask, so plain batches step exactly as before."""
        if all(blend is None for blend, _ in parts):
            return None
        channels, h, w = latent_shape
        masks, inits, noises = [], [], []
        flow = any(blend.flow for blend, _ in parts if blend is not None)  # one model: all or none
        for blend, count in parts:
            if blend is None:
                masks.append(torch.ones(count, 1, h, w, device=device))
                inits.append(torch.zeros(count, channels, h, w, device=device))
                noises.append(torch.zeros(count, channels, h, w, device=device))
            else:
                masks.append(blend.mask), inits.append(blend.init_latents), noises.append(blend.noise)
        return LatentBlend(torch.cat(masks), torch.cat(inits), torch.cat(noises), flow=flow)


@dataclass(frozen=True)
class MaskedStart:
    """What a masked job starts from in latent space."""

    init_latents: Tensor  # [rows, C, h, w]: the image's latents, masked content applied
    blend: LatentBlend | None  # None for an inpainting UNet (it is told the mask instead)
    image_conditioning: Tensor | None  # [rows, 1 + C, h, w] for an inpainting UNet, else None


class Inpainter:
    """The latent side of masked jobs for one loaded model."""

    def __init__(
        self,
        encode: Callable[[Image.Image], Tensor],
        unet_channels: int,
        latent_scale: int,
        device: torch.device,
        dtype: torch.dtype,
        flow: bool = False,
    ) -> None:
        self.flow = flow  # a rectified-flow model: the kept area is noised the flow way
        self.encode = encode  # RGB image -> [1, C, h, w] scaled latents (float32, on the device)
        self.conditioned = unet_channels == INPAINT_CHANNELS
        self.latent_scale = latent_scale
        self.device, self.dtype = device, dtype
        self._grey: dict[tuple[int, int], Tensor] = {}  # (width, height) -> latents of a grey image

    def unmasked_conditioning(self, count: int, width: int, height: int) -> Tensor | None:
        """An inpainting UNet's extra channels for a job without a mask: paint everywhere."""
        if not self.conditioned:
            return None
        if (width, height) not in self._grey:
            self._grey[width, height] = self.encode(Image.new("RGB", (width, height), (127, 127, 127)))
        grey = self._grey[width, height]
        ones = torch.ones(1, 1, *grey.shape[2:], device=self.device)
        return torch.cat([ones, grey], dim=1).expand(count, -1, -1, -1).to(self.dtype)

    def start(self, plan: InpaintPlan, masked_content: str, noise: Tensor) -> MaskedStart:
        """The init latents, blend and conditioning of a masked job; ``noise`` its [rows, C, h, w]."""
        count = noise.shape[0]
        init = self.encode(plan.image).expand(count, -1, -1, -1)
        mask = self.latent_mask(plan.mask).expand(count, -1, -1, -1)
        if masked_content == "latent noise":  # AUTOMATIC1111: the seed's noise in place of the image
            init = init + mask * (noise - init)
        elif masked_content == "latent nothing":
            init = init * (1 - mask)
        if not self.conditioned:
            return MaskedStart(init, LatentBlend(mask, init, noise, flow=self.flow), None)
        hard = Image.fromarray(np.where(np.asarray(plan.mask) >= 128, 255, 0).astype(np.uint8), "L")
        masked_image = Image.composite(Image.new("RGB", plan.image.size, (127, 127, 127)), plan.image, hard)
        image_latents = self.encode(masked_image).expand(count, -1, -1, -1)
        conditioning = torch.cat([mask, image_latents], dim=1).to(self.dtype)
        return MaskedStart(init, None, conditioning)

    def latent_mask(self, mask: Image.Image) -> Tensor:
        """The feathered mask on the latent grid, rounded to 0/1 (as both reference pipelines do)."""
        w, h = mask.width // self.latent_scale, mask.height // self.latent_scale
        small = np.asarray(mask.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        return torch.from_numpy(np.round(small))[None, None].to(self.device)
