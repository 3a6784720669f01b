"""NudeNet's detector as the image filter, where the optional extra is installed (it is not in
the test extra: its LICENSE file is AGPL-3.0). Its bundled model runs on a generated image and on
a public-domain photograph (NASA's portrait of the astronaut Eileen Collins, as scikit-image
ships it), and its detections are mapped to the policy's labels. The mapping itself is tested
everywhere."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bot.safety.nudenet import EXPOSED, scores_of
from bot.safety.policy import ImagePolicy, judge

POLICY = ImagePolicy("blur", ("nsfw",), 0.5, False, 3, None)
CLASSES = ("FACE_FEMALE", "FEMALE_BREAST_EXPOSED", "FEMALE_BREAST_COVERED", "BUTTOCKS_EXPOSED")


def test_detections_become_scores_and_only_exposed_parts_flag():
    covered = scores_of(
        [{"class": "FEMALE_BREAST_COVERED", "score": 0.9}, {"class": "FACE_FEMALE", "score": 0.8}], CLASSES
    )
    assert covered["female_breast_covered"] == 0.9 and covered["nsfw"] == 0.0
    assert not judge([covered], POLICY).flagged
    exposed = scores_of(
        [{"class": "BUTTOCKS_EXPOSED", "score": 0.4}, {"class": "BUTTOCKS_EXPOSED", "score": 0.7}], CLASSES
    )
    assert exposed["nsfw"] == 0.7 and judge([exposed], POLICY).flagged
    assert set(EXPOSED) >= {"FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED"}


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_nudenets_bundled_model_on_a_generated_image_and_the_astronaut():
    pytest.importorskip("nudenet", reason="the optional nudenet extra is not installed")
    from bot.safety.nudenet import NudeNetClassifier

    classifier = NudeNetClassifier.load()
    assert "nsfw" in classifier.labels and "face_female" in classifier.labels
    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    generated = _png(np.stack([gradient, gradient.T, np.full_like(gradient, 128)], axis=-1))
    scores = classifier.classify([generated, b"not a png"])
    assert scores[1] is None  # fail closed
    assert scores[0]["nsfw"] < 0.5 and not judge([scores[0]], POLICY).flagged
    data = pytest.importorskip("skimage.data", reason="scikit-image (for its astronaut photograph) is not installed")
    (astronaut,) = classifier.classify([_png(data.astronaut())])
    assert astronaut["face_female"] > 0.5  # it sees her face
    assert not judge([astronaut], POLICY).flagged  # and nothing the policy counts
