"""torchvision beside a torch of another build: make it import, once, before anything needs it.

spandrel (the upscaler models) imports torchvision, and so do diffusers and transformers when it
is installed. PyPI's Linux torchvision is built for PyPI's CUDA torch. Beside torch's CPU-only
build (``torch==2.13.0+cpu`` from pytorch.org, as on our CI machine) its C++ ops cannot load, and
its import then stops where it registers fake kernels for two of those ops (``nms``, ``qnms``)
that nothing defined: ``RuntimeError: operator torchvision::nms does not exist``. transformers
then fails to import ``CLIPTextModel`` and no model loads at all.

Nothing we run calls torchvision's C++ ops: spandrel uses its Python image transforms (for two
architectures we do not load), and diffusers and transformers only look for it. Declaring the
two operators, without kernels, lets the Python import finish; a call to one of them would still
raise torch's own "no kernel" error, so nothing is faked. Where torchvision imports by itself
(matching builds, the case on a user's GPU machine) or is not installed, this does nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)

_declared: list = []  # the torch.library.Library that holds the declarations, kept alive


def torchvision_importable() -> None:
    """Import torchvision now, declaring its two missing operators first if its build needs them."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package, so that it imports again from the start
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(library)
    importlib.import_module("torchvision")
    log.info(
        "torchvision %s is not the build of torch %s (its C++ ops are unavailable; nothing here uses them)",
        sys.modules["torchvision"].__version__,
        torch.__version__,
    )
