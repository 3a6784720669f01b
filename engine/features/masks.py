"""Masks in pixel space: reading, feathering, the "only masked" crop, filling and pasting back.

A masked job (``GenerationParams.mask``) changes only the area its mask selects. What happens
around the denoising loop follows AUTOMATIC1111's img2img inpainting (``modules/processing.py``),
so members who know its options get what they expect:

1. The mask is read as white (or transparent) = repaint, made binary, and feathered by a
   Gaussian blur of ``mask_blur`` pixels (:func:`blur_mask`).
2. "Whole picture": the init image and the mask are fitted to the job's size. "Only masked"
   (``inpaint_full_res``): the init image keeps its own size; the masked area plus
   ``inpaint_padding`` pixels, widened to the job's aspect ratio (:func:`crop_region`), is cut
   out and generated at the job's size.
3. Masked content "fill" replaces the masked pixels by their surroundings' colours
   (:func:`fill_masked`) before the image is encoded.
4. After decoding, the generated image is pasted back (scaled to the crop) and composited over
   the init image with the feathered mask as alpha (:meth:`InpaintPlan.paste`): where the alpha
   is 0 the result *is* the init image's pixel, so nothing outside the feathered mask changes.

Torch-free: plain PIL and numpy, so the bot can check and preview masks without the engine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import GenerationError
from engine.params import GenerationParams

Box = tuple[int, int, int, int]  # left, top, right, bottom (PIL's crop box)


def open_image(data: bytes, what: str = "init image") -> Image.Image:
    """Decode an uploaded image, upright (EXIF orientation applied), in its own mode."""
    try:
        image = Image.open(io.BytesIO(data))
        return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise GenerationError(f"The {what} could not be read ({e}); attach a PNG, JPEG or WebP image.") from e


def read_mask(data: bytes, size: tuple[int, int]) -> Image.Image:
    """The mask as a binary ``L`` image of ``size`` (255 = repaint).

    White means repaint; in an image with transparency, transparent means repaint (a member
    erases what should change). A mask of another size is stretched to ``size``.
    """
    mask = repaint_area(open_image(data, "mask"))
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask.point(lambda v: 255 if v >= 128 else 0)


def repaint_area(image: Image.Image) -> Image.Image:
    """A mask image as grey ``L``, light where to repaint: its brightness, or, in an image with
    transparency where some of it is at least half transparent (a member erased what should
    change), its transparency. Used for uploads at the bot's boundary and for stored masks alike."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 128:
            return ImageOps.invert(alpha)
    return image.convert("L")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian of AUTOMATIC1111's width for a mask blur: ``2 * int(2.5 sigma + 0.5) + 1`` taps."""
    radius = int(2.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array, mirrored at the border (as OpenCV's default)."""
    if sigma <= 0:
        return values.astype(np.float64)
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    out = values.astype(np.float64)
    for axis in (0, 1):
        if out.shape[axis] <= radius:  # too small to mirror: repeat the edge instead
            padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        else:
            padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        n = out.shape[axis]
        out = sum(weight * np.take(padded, range(i, i + n), axis=axis) for i, weight in enumerate(kernel))
    return out


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """The feathered mask (``L``): a binary mask blurred with a Gaussian of ``radius`` pixels.

    It reaches at most ``feather_reach(radius)`` pixels (along each axis) past the binary mask.
    """
    box = mask.getbbox()
    if radius <= 0 or box is None:
        return mask.copy()
    # Only the mask's surroundings can change: blur the box grown by twice the reach, so every
    # pixel the feather reaches sees all it depends on (and zeros mirrored at the cut).
    reach = 2 * feather_reach(radius)
    x1, y1 = max(box[0] - reach, 0), max(box[1] - reach, 0)
    x2, y2 = min(box[2] + reach, mask.width), min(box[3] + reach, mask.height)
    blurred = gaussian_blur(np.asarray(mask.crop((x1, y1, x2, y2)), dtype=np.float64), radius)
    out = mask.copy()
    out.paste(Image.fromarray(np.clip(np.rint(blurred), 0, 255).astype(np.uint8), "L"), (x1, y1))
    return out


def feather_reach(radius: int) -> int:
    """How far (pixels, along each axis) the feathered mask reaches past the binary one."""
    return int(2.5 * radius + 0.5) if radius > 0 else 0


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> Box | None:
    """ "Only masked": the box around the mask plus ``padding``, widened to ``width:height`` inside
    the mask's image; None when the mask is empty."""
    box = mask.getbbox()
    if box is None:
        return None
    image_w, image_h = mask.size
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, image_w), min(box[3] + padding, image_h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widen(y1, y2, round((x2 - x1) / ratio), image_h)
    else:
        x1, x2 = _widen(x1, x2, round((y2 - y1) * ratio), image_w)
    return x1, y1, x2, y2


def _widen(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """Grow ``[start, end)`` to ``length`` around its middle, shifted to stay inside ``[0, limit)``."""
    length = min(max(length, end - start), limit)
    start -= (length - (end - start)) // 2
    start = min(max(start, 0), limit - length)
    return start, start + length


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with its masked pixels (mask >= 128) replaced by a smooth spread of the colours
    around them (a push-pull fill: averages over ever coarser grids, brought back down)."""
    keep = (np.asarray(mask) < 128).astype(np.float64)
    if keep.all() or not keep.any():
        return image.copy() if keep.all() else Image.new("RGB", image.size, (127, 127, 127))
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    filled = _push_pull(rgb * keep[..., None], keep)
    out = np.where(keep[..., None] > 0, rgb, filled)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _push_pull(weighted: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Colours for every pixel from ``weighted`` (colour x weight) and ``weight`` (known = 1)."""
    h, w = weight.shape
    if h == 1 and w == 1 or weight.min() > 0:
        return weighted / np.maximum(weight, 1e-12)[..., None]
    # Sum 2x2 cells (odd sizes padded with unknown pixels), solve the coarser grid, come back up.
    ph, pw = h % 2, w % 2
    weighted_p = np.pad(weighted, ((0, ph), (0, pw), (0, 0)))
    weight_p = np.pad(weight, ((0, ph), (0, pw)))
    coarse_weighted = weighted_p.reshape((h + ph) // 2, 2, (w + pw) // 2, 2, 3).sum(axis=(1, 3))
    coarse_weight = weight_p.reshape((h + ph) // 2, 2, (w + pw) // 2, 2).sum(axis=(1, 3))
    coarse = _push_pull(coarse_weighted, coarse_weight)
    up = np.stack(
        [
            np.asarray(
                Image.fromarray(coarse[..., c].astype(np.float32), "F").resize(
                    (w + pw, h + ph), Image.Resampling.BILINEAR
                )
            )
            for c in range(3)
        ],
        axis=-1,
    )
    up = up[:h, :w].astype(np.float64)
    here = weighted / np.maximum(weight, 1e-12)[..., None]
    known = np.clip(weight, 0, 1)[..., None]
    return known * here + (1 - known) * up


@dataclass(frozen=True)
class InpaintPlan:
    """A masked job in pixel space: what it generates from, and how its result is put back."""

    image: Image.Image  # RGB at the job's size: what is encoded (after "fill", if asked)
    mask: Image.Image  # L at the job's size: the feathered mask (the latent mask is made from it)
    canvas: Image.Image  # RGB at the result's size: the init image the result is composited over
    alpha: np.ndarray  # float32 [canvas h, w] in [0, 1]: 1 = generated pixel, 0 = canvas pixel
    box: Box | None  # "only masked": where the job's image goes on the canvas

    def paste(self, generated: Image.Image) -> Image.Image:
        """The finished image: ``generated`` put back and blended over the canvas by ``alpha``."""
        if self.box is None:
            placed = generated.convert("RGB")
        else:
            x1, y1, x2, y2 = self.box
            placed = self.canvas.copy()
            placed.paste(generated.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
        # Only where the alpha is above 0 is anything blended: the rest is the canvas as it is.
        rows, cols = np.nonzero(self.alpha.any(axis=1))[0], np.nonzero(self.alpha.any(axis=0))[0]
        out = np.array(self.canvas)
        if rows.size:
            area = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            canvas = out[area].astype(np.float32)
            blended = canvas + (np.asarray(placed)[area] - canvas) * self.alpha[area][..., None]
            out[area] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return Image.fromarray(out, "RGB")


def plan_inpaint(params: GenerationParams) -> InpaintPlan:
    """Read a masked job's init image and mask, and lay out what to generate (see the module)."""
    size = params.width, params.height
    init = open_image(params.init_image).convert("RGB")
    mask = read_mask(params.mask, init.size)
    if mask.getbbox() is None:
        raise GenerationError(
            "The mask selects nothing: paint the area to change in white (or leave it transparent) and the rest black."
        )
    feathered = blur_mask(mask, params.mask_blur)
    if params.inpaint_full_res:
        box = crop_region(feathered, params.inpaint_padding, *size)
        image = init.crop(box).resize(size, Image.Resampling.LANCZOS)
        job_mask = feathered.crop(box).resize(size, Image.Resampling.LANCZOS)
        canvas, alpha = init, np.asarray(feathered, dtype=np.float32) / 255
    else:
        box = None
        image = ImageOps.fit(init, size, Image.Resampling.LANCZOS, centering=(0.5, 0.5))
        job_mask = ImageOps.fit(feathered, size, Image.Resampling.LANCZOS, centering=(0.5, 0.5))
        # As AUTOMATIC1111: the blend mask is the feather doubled, so the masked area itself is
        # fully generated and the feather fades out past its edge.
        canvas, alpha = image, np.clip(np.asarray(job_mask, dtype=np.float32) * 2 / 255, 0, 1)
    if params.masked_content == "fill":
        image = fill_masked(image, job_mask)
    return InpaintPlan(image=image, mask=job_mask, canvas=canvas, alpha=alpha, box=box)
