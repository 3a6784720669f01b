"""The blurred copy a ``blur`` policy posts in place of a flagged image.

Shrunk to 1/16 of its side, blurred, and scaled back: nothing recognisable survives, whatever
the blur radius a viewer's client applies. It carries no ``parameters`` text (the prompt stays in
the embed, the original in the database for Reveal and the moderators).
"""

from __future__ import annotations

import io

from PIL import Image, ImageFilter

#: How far the image is shrunk before it is blurred (its side, divided).
SHRINK = 16


def blurred_png(png: bytes) -> bytes:
    """A blurred copy of a PNG, of the same size."""
    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        small = image.resize((max(1, image.width // SHRINK), max(1, image.height // SHRINK)), Image.Resampling.BOX)
        small = small.filter(ImageFilter.GaussianBlur(2))
        out = io.BytesIO()
        small.resize(image.size, Image.Resampling.BILINEAR).save(out, format="PNG")
        return out.getvalue()
