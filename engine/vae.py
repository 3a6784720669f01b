"""The VAE's decode in the model's precision, with a float32 retry for only the images it gets wrong.

A float16/bfloat16 VAE runs at about twice the speed and half the memory of a float32 one, but the
SD and SDXL VAEs can overflow in float16 (diffusers marks them ``force_upcast``) into NaN/inf, or
into black once clamped. Rather than decode every image in float32 for the few that overflow, each
chunk is decoded in low precision and only its bad images again by a float32 copy of the VAE (one
host sync per chunk, at finishing, to know which). A VAE that gets *every* image wrong
:data:`GIVE_UP_AFTER` decodes in a row (SDXL's in float16 does) is given up for float32 for good,
with a log line, so it does not decode each image twice.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: A decoded image whose every value is at most this is black (0 or 1 of 255 once rounded).
BLACK = -1 + 1.5 / 127.5
#: Latents with a spread below this are flat, and may well decode to black.
FLAT_LATENTS = 1e-2
#: Decodes in a row in which a low-precision VAE got every image wrong before it is given up for float32.
GIVE_UP_AFTER = 3


class VaeDecoder:
    """Scaled latents -> float32 pixels, in chunks, with the float32 retry."""

    def __init__(self, vae, scaling_factor: float) -> None:
        self.vae, self.scaling_factor = vae, scaling_factor
        self._fp32 = None  # made on the first image the low-precision VAE gets wrong
        self.all_bad_streak = 0  # decodes in a row where the low-precision VAE got every image wrong

    @property
    def low_precision(self) -> bool:
        return self.vae.dtype != torch.float32 and self.all_bad_streak < GIVE_UP_AFTER

    def float32_vae(self):
        """The VAE in float32: the model's own when it already is, else a copy made once."""
        if self.vae.dtype == torch.float32:
            return self.vae
        if self._fp32 is None:
            with torch.inference_mode(False):  # real parameters, usable in and out of inference mode
                self._fp32 = copy.deepcopy(self.vae).to(torch.float32).requires_grad_(False)
        return self._fp32

    def __call__(self, latents: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
        """Pixels ``[n, 3, H, W]`` in [-1, 1] on the device, and ``[n]`` bool: invalid even in float32.

        A float32 image that is black is kept: at full precision it is what the model made.
        """
        decoded, invalid = [], []
        for chunk in latents.split(chunk_size):
            low_precision = self.low_precision
            pixels = self.decode(self.vae if low_precision else self.float32_vae(), chunk)
            bad = ~torch.isfinite(pixels).flatten(1).all(1)
            if low_precision:
                black = pixels.flatten(1).amax(1) <= BLACK
                bad |= black & (chunk.flatten(1).std(1) > FLAT_LATENTS)
                retry = [i for i, invalid_image in enumerate(bad.tolist()) if invalid_image]
                self._note(len(retry), len(chunk))
                if retry:
                    pixels[retry] = self.decode(self.float32_vae(), chunk[retry])
                    bad = ~torch.isfinite(pixels).flatten(1).all(1)
            decoded.append(pixels)
            invalid.append(bad)
        return torch.cat(decoded), torch.cat(invalid)

    def _note(self, retried: int, images: int) -> None:
        self.all_bad_streak = self.all_bad_streak + 1 if retried == images else 0
        if not retried:
            return
        dtype = str(self.vae.dtype).removeprefix("torch.")
        log.warning("%d of %d image(s) invalid from the %s VAE; decoding them again in float32", retried, images, dtype)
        if self.all_bad_streak == GIVE_UP_AFTER:
            log.warning(
                "the %s VAE got every image wrong %d decodes in a row: float32 from now on", dtype, GIVE_UP_AFTER
            )

    def decode(self, vae, latents: Tensor) -> Tensor:
        """Scaled latents -> float32 pixels in [-1, 1] (NaN/inf passed through, for the caller to see)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = (latents / self.scaling_factor + shift).to(vae.dtype)
        return vae.decode(z, return_dict=False)[0].float()
