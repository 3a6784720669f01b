"""NudeNet's detector as the image filter (``safety.classifier = "nudenet"``), an optional extra.

**Licence.** NudeNet's package metadata says MIT, but the LICENSE file in its wheel is the
AGPL-3.0. It is therefore never a dependency of this Apache-2.0 project: an operator who wants
it installs it themselves (``pip install -e ".[nudenet]"``), and takes on its licence.

**What it gives.** A YOLO detector (``320n.onnx``, shipped inside the package, run by
onnxruntime on the CPU) that finds body parts, exposed or covered, with a score each. We turn
its detections into the classifier's shape: one score per NudeNet class (the best detection of
it, 0 when none), lower-cased (``female_breast_exposed``...), and ``nsfw``, the best score of the
exposed sexual parts (:data:`EXPOSED`), so the default ``safety.labels`` work unchanged.
"""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from bot.safety.classifier import ClassifierError, Scores

log = logging.getLogger(__name__)

#: NudeNet's classes that make an image ``nsfw``.
EXPOSED = (
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)


class NudeNetClassifier:
    """The same face as :class:`bot.safety.classifier.ImageClassifier` (labels, classify)."""

    source = "nudenet"

    def __init__(self, detector: object, classes: Sequence[str], *, batch_size: int = 8) -> None:
        self.detector, self.batch_size = detector, batch_size
        self.classes = tuple(classes)
        self.labels = ("nsfw", *(name.lower() for name in self.classes))

    @classmethod
    def load(cls, *, batch_size: int = 8) -> NudeNetClassifier:
        try:
            import nudenet

            # Its class list, in its model's order (a module-private name: read, not imported,
            # since a class body would mangle the double underscore).
            classes = vars(importlib.import_module("nudenet.nudenet"))["__labels"]
        except ImportError as exc:
            raise ClassifierError(
                f"safety.classifier = 'nudenet': NudeNet is not installed ({exc}); install the optional "
                'extra with `pip install -e ".[nudenet]"` (NudeNet\'s LICENSE is AGPL-3.0), or name a '
                "transformers model instead"
            ) from exc
        try:
            detector = nudenet.NudeDetector()
        except Exception as exc:  # onnxruntime's errors come in many types
            raise ClassifierError(f"safety.classifier = 'nudenet': its model could not be loaded ({exc})") from exc
        return cls(detector, classes, batch_size=batch_size)

    def classify(self, pngs: Sequence[bytes]) -> list[Scores | None]:
        return [self._one(data, i, len(pngs)) for i, data in enumerate(pngs)]

    def _one(self, data: bytes, index: int, count: int) -> Scores | None:
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGBA"))  # NudeNet reads an array as RGBA
            detections = self.detector.detect(pixels)
        except Exception:
            log.exception("image check: NudeNet failed on image %d of %d; it is withheld", index + 1, count)
            return None
        return scores_of(detections, self.classes)


def scores_of(detections: Sequence[dict], classes: Sequence[str]) -> Scores:
    """NudeNet's detections as scores per (lower-cased) class, with ``nsfw`` the best exposed one."""
    best = dict.fromkeys(classes, 0.0)
    for detection in detections:
        name = detection["class"]
        best[name] = max(best.get(name, 0.0), float(detection["score"]))
    scores = {name.lower(): score for name, score in best.items()}
    scores["nsfw"] = max(best.get(name, 0.0) for name in EXPOSED)
    return scores
