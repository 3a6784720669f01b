"""The image classifier: a transformers image-classification model, run in batches on a thread
of its own.

**Where it runs, and why there.** In the bot process, on one thread of its own, called by
delivery for results and by admission for uploads. Not on the engine's finishing pool: the
engine may be in another process or on other machines (``python -m engine worker``), while
uploads must be judged before their job is stored and results by the server's policy, both of
which only the bot knows; and a thread the engine does not wait on keeps the denoising step
free by construction (the engine never calls it). torch releases the GIL in its kernels, so the
event loop and the engine's thread go on while it runs. Results are classified once, and the
verdict is stored on the job: a retry, a restart or ``/show`` reads it instead.

**Loading** follows the checkpoints' rules: a local folder is read with ``local_files_only``;
anything else is a Hugging Face Hub id, fetched into the hub cache (``HF_HUB_OFFLINE=1`` makes
it cache-only). Every failure is one :class:`ClassifierError` line naming the source and what to
do, and ``python -m bot`` stops on it rather than run without the check it was told to make.

**Failing closed.** An image the model cannot read (a PNG it cannot decode, a batch that
raises) gets no scores (None), which the policy treats as flagged: a broken check withholds,
it never waves an image through. A batch that raises is retried image by image, so one bad
image does not take its neighbours' verdicts with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

log = logging.getLogger(__name__)

#: Scores by label (probabilities), or None where the image could not be classified.
Scores = dict[str, float]


class Classifies(Protocol):
    """What :class:`SafetyCheck` runs: :class:`ImageClassifier`, or NudeNet's (``bot.safety.nudenet``)."""

    labels: tuple[str, ...]

    def classify(self, pngs: Sequence[bytes]) -> list[Scores | None]: ...


class ClassifierError(Exception):
    """The image classifier could not be loaded; check `safety.classifier` in config.toml."""


class ImageClassifier:
    """A loaded classifier; :meth:`classify` is blocking (see :class:`SafetyCheck` for the thread)."""

    def __init__(self, model: Any, processor: Any, *, source: str, batch_size: int = 8, device: str = "cpu") -> None:
        self.model, self.processor, self.source = model, processor, source
        self.batch_size, self.device = batch_size, device
        id2label = model.config.id2label or {}
        self.labels = tuple(str(id2label[i]).lower() for i in sorted(id2label))
        self._multi_label = model.config.problem_type == "multi_label_classification"

    @classmethod
    def load(cls, source: str, *, batch_size: int = 8, device: str = "cpu") -> ImageClassifier:
        """Load ``source`` (a local folder or a hub id); raises :class:`ClassifierError`."""
        try:
            from engine.torch_builds import torchvision_importable

            torchvision_importable()  # before transformers looks for it (see engine/torch_builds.py)
            from transformers import AutoImageProcessor, AutoModelForImageClassification
        except Exception as exc:
            raise ClassifierError(f"safety.classifier: transformers cannot be imported ({exc})") from exc
        folder = Path(source).expanduser()
        local = folder.is_dir()
        if not local and (source.startswith((".", "/", "~")) or source.count("/") != 1):
            raise ClassifierError(
                f"safety.classifier = {source!r}: no such folder, and not a Hugging Face Hub id (owner/name)"
            )
        where = str(folder) if local else source
        try:
            model = AutoModelForImageClassification.from_pretrained(where, local_files_only=local)
            processor = AutoImageProcessor.from_pretrained(where, local_files_only=local)
        except Exception as exc:
            hint = (
                "a folder saved with save_pretrained (config.json, weights, preprocessor_config.json)"
                if local
                else "if this machine is offline, download it elsewhere and set safety.classifier to the folder"
            )
            raise ClassifierError(
                f"safety.classifier = {source!r}: could not load an image classifier "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {hint}"
            ) from exc
        model.eval().to(device)
        classifier = cls(model, processor, source=source, batch_size=batch_size, device=device)
        if not classifier.labels:
            raise ClassifierError(f"safety.classifier = {source!r}: the model names no labels (config.id2label)")
        return classifier

    def classify(self, pngs: Sequence[bytes]) -> list[Scores | None]:
        """Scores for each image, in order; None for one that could not be classified."""
        results: list[Scores | None] = [None] * len(pngs)
        images: list[tuple[int, Image.Image]] = []
        for i, data in enumerate(pngs):
            image = _decoded(data)
            if image is None:
                log.warning("image check: image %d of %d could not be decoded; it is withheld", i + 1, len(pngs))
            else:
                images.append((i, image))
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            try:
                scores = self._run([image for _, image in chunk])
            except Exception:  # noqa: BLE001 - isolated below, one image at a time
                scores = [self._one(image) for _, image in chunk]
            for (i, _), score in zip(chunk, scores, strict=True):
                results[i] = score
        return results

    def _one(self, image: Image.Image) -> Scores | None:
        try:
            return self._run([image])[0]
        except Exception:
            log.exception("image check: the classifier failed on an image; it is withheld")
            return None

    def _run(self, images: list[Image.Image]) -> list[Scores]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits.float()
        probs = logits.sigmoid() if self._multi_label else logits.softmax(dim=-1)
        if not torch.isfinite(probs).all():
            raise ValueError("the classifier's scores are not finite")
        return [dict(zip(self.labels, row.tolist(), strict=True)) for row in probs.cpu()]


def _decoded(data: bytes) -> Image.Image | None:
    """The image as RGB (alpha over white), or None for bytes PIL cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, image).convert("RGB")
            return image.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable upload is simply not classified
        return None


class SafetyCheck:
    """The classifier behind an asyncio face: one thread, calls in order, batches as given."""

    def __init__(self, classifier: Classifies) -> None:
        self.classifier = classifier
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdbot-safety")

    @property
    def labels(self) -> tuple[str, ...]:
        return self.classifier.labels

    async def scores(self, pngs: Sequence[bytes]) -> list[Scores | None]:
        """Scores for each image (None: it could not be classified); never raises for an image."""
        if not pngs:
            return []
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self.classifier.classify, list(pngs))
        except Exception:
            log.exception("image check: the classifier failed; %d image(s) withheld", len(pngs))
            return [None] * len(pngs)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
