"""Midjourney's /describe: four prompts for an uploaded image, from image-to-text models.

Two kinds of model, either or both (``[describe]``):

- a transformers captioner (``AutoModelForImageTextToText`` with its ``AutoProcessor``: BLIP's
  ``BlipForConditionalGeneration``, or another that the auto classes know) from a local folder or
  a hub id, as the checkpoints are (``captioner``): sentences, for photographic models;
- a WD14 booru tagger (ONNX, :mod:`engine.features.booru_tagger`; ``tagger``): Danbooru tags,
  for anime models.

Each is loaded on the first /describe job, on the worker that takes it, and runs in a thread of
the worker's runner (one job at a time), in the queue like any job, never on the event loop.

The captioner's prompts are its samples (nucleus sampling, seeded by the job's seed, so a job
gives the same again), repeats dropped and drawn again up to a bound. The tagger's tags are the
same for any seed. With both, the prompts mix them (:func:`mixed`): three sentences with the tags
appended, then the tags alone, the prompt an anime model reads best. With the tagger alone, the
four are its tags at four general thresholds (:data:`TAG_THRESHOLDS`: the reference's, then
surer, more, and the surest tags), repeats dropped. Each prompt comes back as a small PNG of the
upload carrying it in AUTOMATIC1111's ``parameters`` chunk, so the results are stored, posted and
read ("Image info") as any job's.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from engine.config.describe_settings import DescribeSettings
from engine.config.settings import EngineSettings
from engine.errors import GenerationError
from engine.features.booru_tagger import GENERAL_THRESHOLD, BooruTagger, prompt_tags
from engine.metadata import encode_png
from engine.types import GeneratedImage, GenerationRequest, GenerationResult, Progress

#: Prompts per /describe, as Midjourney gives.
PROMPTS = 4
#: Samples drawn at most to find four different prompts.
MAX_SAMPLES = 16
#: The thumbnail each prompt is stored with (the longer side, in pixels).
THUMBNAIL = 256
MAX_NEW_TOKENS = 40
#: The tagger's general thresholds for its prompts without a captioner: the reference's, then
#: surer tags only, more tags, and the surest (character tags stay at the reference's 0.85).
TAG_THRESHOLDS = (GENERAL_THRESHOLD, 0.5, 0.25, 0.65)


class Describer:
    """The configured captioner and tagger, loaded on first use, run one job at a time off the event loop."""

    def __init__(self, source: str = "", device: str = "cpu", *, tagger: str = "") -> None:
        self.source, self.device, self.tagger_source = source, device, tagger
        self._loaded: tuple[object, object] | None = None
        self._tagger: BooruTagger | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[object, object]:
        if self._loaded is None:
            from engine.torch_builds import torchvision_importable

            torchvision_importable()  # before transformers looks for it (see engine/torch_builds.py)
            from transformers import AutoModelForImageTextToText, AutoProcessor

            folder = Path(self.source).expanduser()
            local = folder.is_dir()
            where = str(folder) if local else self.source
            try:
                model = AutoModelForImageTextToText.from_pretrained(where, local_files_only=local)
                processor = AutoProcessor.from_pretrained(where, local_files_only=local)
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise GenerationError(
                    f"describe.captioner = {self.source!r} could not be loaded ({type(exc).__name__}: {first}); "
                    "a folder saved with save_pretrained, or a hub id this machine can fetch."
                ) from exc
            self._loaded = (model.eval().to(self.device), processor)
        return self._loaded

    def prompts(self, image: Image.Image, seed: int) -> list[str]:
        """Four different prompts for ``image`` (fewer only when the models keep repeating themselves)."""
        with self._lock:
            tag_sets = self._tag_sets(image) if self.tagger_source else []
            wanted = PROMPTS - 1 if tag_sets and tag_sets[0] else PROMPTS  # room for the tags alone
            captions = self._captions(image, seed, wanted) if self.source else []
        return mixed(captions, tag_sets)

    def _tag_sets(self, image: Image.Image) -> list[list[str]]:
        """The tagger's tags at each of :data:`TAG_THRESHOLDS`, the reference's first."""
        if self._tagger is None:
            self._tagger = BooruTagger.load(self.tagger_source, self.device)
        scores = self._tagger.scores(image)
        return [prompt_tags(self._tagger.labels, scores, general=t) for t in TAG_THRESHOLDS]

    def _captions(self, image: Image.Image, seed: int, count: int) -> list[str]:
        """``count`` different samples of the captioner, seeded by ``seed``."""
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            model, processor = self._load()
            torch.manual_seed(seed)
            inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
            found: list[str] = []
            for _ in range(MAX_SAMPLES // count):
                out = model.generate(
                    **inputs, do_sample=True, top_p=0.9, num_return_sequences=count, max_new_tokens=MAX_NEW_TOKENS
                )
                for text in processor.batch_decode(out, skip_special_tokens=True):
                    text = " ".join(text.split()).strip(" ,.")
                    if text and text not in found:
                        found.append(text)
                if len(found) >= count:
                    break
            return found[:count]

    def describe(self, request: GenerationRequest) -> GenerationResult:
        """A /describe job: its init image's prompts, each as a thumbnail PNG carrying it."""
        started = time.monotonic()
        if request.params.init_image is None:
            raise GenerationError("A /describe job needs its image.")
        with Image.open(io.BytesIO(request.params.init_image)) as upload:
            image = upload.convert("RGB")
        prompts = self.prompts(image, request.params.seed)
        if not prompts:
            raise GenerationError("/describe found nothing to say about this image; try another.")
        thumbnail = image.copy()
        thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
        results = [
            GeneratedImage(png=encode_png(thumbnail, prompt, request.job_id), seed=request.params.seed + i)
            for i, prompt in enumerate(prompts)
        ]
        return GenerationResult(request.job_id, results, prompts[0], seconds=time.monotonic() - started)

    async def generate(
        self, request: GenerationRequest, on_progress: Callable[[Progress], None] | None = None
    ) -> GenerationResult:
        """What the runner awaits for a /describe job (as ``EngineWorker.generate``), in a thread.
        One progress report as it starts: the queue counts the attempt, and the status shows it."""
        if on_progress is not None:
            on_progress(Progress(request.job_id, 0, 1))
        return await asyncio.to_thread(self.describe, request)


def mixed(captions: list[str], tag_sets: list[list[str]]) -> list[str]:
    """The prompts from the captioner's sentences and the tagger's tags at :data:`TAG_THRESHOLDS`
    (either may be empty): three sentences with the reference threshold's tags appended, then
    those tags alone; or whichever of the two there is. Repeats dropped, at most :data:`PROMPTS`."""
    if captions and tag_sets and tag_sets[0]:
        tags = ", ".join(tag_sets[0])
        prompts = [f"{caption}, {tags}" for caption in captions[: PROMPTS - 1]] + [tags]
    else:
        prompts = captions or [", ".join(found) for found in tag_sets if found]
    return list(dict.fromkeys(prompts))[:PROMPTS]


def describer_for(settings: DescribeSettings, engine: EngineSettings) -> Describer | None:
    """The configured captioner and tagger (not loaded yet) on the engine's device; None when neither is set."""
    if not settings.offered:
        return None
    from engine.config.settings import resolve_device

    device, _dtype = resolve_device(engine)
    return Describer(settings.captioner, str(device), tagger=settings.tagger)
