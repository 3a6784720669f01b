"""A ControlNet unit's image -> its control map: resized to the job's size by the unit's resize
mode, then through its preprocessor, as AUTOMATIC1111's ControlNet extension makes them.

The image operations are the extension's own (``annotator/`` and ``scripts/processor.py``):
``canny`` is OpenCV's Canny on the RGB image with the extension's default thresholds 100 and 200;
``tile`` (``tile_resample``) is the image itself at its default down-sampling rate of 1; ``blur``
(``blur_gaussian``) OpenCV's Gaussian blur with sigma 9. The map is made at the job's size
(the extension makes it at its processor resolution, then resizes it to the job's).
Model-based annotators (depth, openpose, lineart, soft edge) are not part of this module: a unit
that names one is refused with the list of those that are here (:func:`annotator_refusal`).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageOps

from engine.control_units import PREPROCESSORS, PROCESSOR_DEFAULTS

CANNY_LOW, CANNY_HIGH = PROCESSOR_DEFAULTS["canny"][1:]
BLUR_SIGMA = PROCESSOR_DEFAULTS["blur"][1]


def annotator_refusal(module: str) -> str | None:
    if module in PREPROCESSORS:
        return None
    return f"The {module!r} preprocessor is not installed; use one of {', '.join(PREPROCESSORS)}."


def resized(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """The member's image at the job's size: "Just Resize" stretches, "Crop and Resize" fills and
    crops the centre, "Resize and Fill" fits inside and pads with the median of its border pixels
    (the extension's ``high_quality_border_color``)."""
    image = image.convert("RGB")
    if resize_mode == "Just Resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if resize_mode == "Crop and Resize":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colour = tuple(int(c) for c in np.median(border, axis=0))
    return ImageOps.pad(image, (width, height), Image.Resampling.LANCZOS, color=colour, centering=(0.5, 0.5))


def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges).convert("RGB")


def blur(image: Image.Image, sigma: float = BLUR_SIGMA) -> Image.Image:
    return Image.fromarray(cv2.GaussianBlur(np.asarray(image.convert("RGB")), (0, 0), sigma))


ANNOTATORS = {"none": lambda image: image, "canny": canny, "tile": lambda image: image, "blur": blur}


def control_map(image: Image.Image, module: str, width: int, height: int, resize_mode: str) -> Image.Image:
    """The unit's control map at width x height (RGB; the ControlNet reads it as [0, 1])."""
    return ANNOTATORS[module](resized(image, width, height, resize_mode))
