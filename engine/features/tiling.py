"""Seamless tiling (AUTOMATIC1111's "Tiling"): the UNet's and the VAE's convolutions pad
circularly, so that the image's left edge continues its right one and its top its bottom.

As A1111 does it, the padding mode of every ``Conv2d`` is switched for the whole model: it is
per module, not per row, so tiled and untiled jobs never share a batch (the worker's batch key,
:func:`engine.serving.models.batch_key`, holds the job's ``tiling``), and the mode is set when a job is
prepared, as its LoRA set is. The VAE's float32 copy (:mod:`engine.vae`) follows.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def set_tiling(modules: Iterable[nn.Module | None], tiling: bool) -> None:
    """Every ``Conv2d`` of ``modules`` pads circularly (``tiling``) or with zeros (the default)."""
    mode = "circular" if tiling else "zeros"
    for module in modules:
        if module is None:
            continue
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                layer.padding_mode = mode
