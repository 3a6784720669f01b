r"""/describe's booru tagger: SmilingWolf's WD14 taggers (ONNX, run by onnxruntime), whose Danbooru
tags are the words anime models were trained on.

**Reference.** We run the model as SmilingWolf's own demo does, the ``app.py`` of the Hugging Face
Space ``SmilingWolf/wd-tagger`` (kohya-ss's ``tag_images_by_wd14_tagger.py`` and the A1111
tagger extension's interrogator run it the same way):

1. the upload composited on white (its alpha), pasted centred on a white square of its longer side;
2. resized with bicubic to the model's input size, read from its input's shape (448 for every
   v2 and v3 tagger);
3. float32 0-255, channels in BGR order, NHWC with a batch of one (the model normalises itself);
4. the outputs are sigmoid scores already, one per row of ``selected_tags.csv``;
5. rating tags (category 9) left out; general tags (0) over 0.35, character tags (4) over 0.85;
   underscores to spaces except in kaomoji (``^_^``); parentheses escaped (``\(``), so that
   A1111's emphasis reads ``(vocaloid)`` as text; sorted by score.

One choice is ours: character tags come before the general ones (kohya's
``--character_tags_first``), as anime models' prompts put them.

**Loading** follows the checkpoints' rules: a folder holding ``model.onnx`` and
``selected_tags.csv`` as SmilingWolf's repositories ship them is read as it is; anything else is a
Hugging Face Hub id whose two files are fetched into the hub cache (``HF_HUB_OFFLINE=1`` makes it
cache-only). Every failure is one line naming ``describe.tagger`` and what to do.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import GenerationError

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
#: ``selected_tags.csv``'s categories.
GENERAL, CHARACTER, RATING = 0, 4, 9
#: The reference's default thresholds (a score must be over them).
GENERAL_THRESHOLD, CHARACTER_THRESHOLD = 0.35, 0.85
#: The input size of every v2 and v3 tagger, for a model whose input shape does not say.
INPUT_SIZE = 448
#: Tags whose underscores are the face, as the reference keeps them.
KAOMOJI = frozenset("0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||".split())


@dataclass(frozen=True)
class Label:
    """One output of the model: the tag as a prompt writes it, and its category."""

    text: str
    category: int


def tag_text(name: str) -> str:
    """A Danbooru tag as a prompt writes it: ``hatsune_miku_(vocaloid)`` -> ``hatsune miku \\(vocaloid\\)``."""
    text = name if name in KAOMOJI else name.replace("_", " ")
    return text.replace("(", "\\(").replace(")", "\\)")


def read_labels(path: Path) -> list[Label]:
    """``selected_tags.csv`` (``tag_id,name,category,count``), one label per model output, in order."""
    with path.open(newline="", encoding="utf-8") as f:
        return [Label(tag_text(row["name"]), int(row["category"])) for row in csv.DictReader(f)]


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """The model's input for ``image``: on white, padded square, resized, BGR float32 NHWC."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    side = max(canvas.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(canvas.convert("RGB"), ((side - canvas.width) // 2, (side - canvas.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR
    return np.ascontiguousarray(pixels)[None]


def prompt_tags(
    labels: list[Label],
    scores: np.ndarray,
    general: float = GENERAL_THRESHOLD,
    character: float = CHARACTER_THRESHOLD,
) -> list[str]:
    """The tags over their thresholds, characters first, each group by score; ratings left out."""
    over = {GENERAL: general, CHARACTER: character}
    chosen = [
        (label, float(score))
        for label, score in zip(labels, scores, strict=True)
        if label.category in over and score > over[label.category]
    ]
    chosen.sort(key=lambda pair: (pair[0].category != CHARACTER, -pair[1]))
    return [label.text for label, _ in chosen]


def tagger_files(source: str) -> tuple[Path, Path]:
    """``model.onnx`` and ``selected_tags.csv`` of a folder, or of a hub id fetched into the hub cache."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        files = folder / MODEL_FILE, folder / TAGS_FILE
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise GenerationError(
                f"describe.tagger = {source!r}: the folder has no {' or '.join(missing)}; give a folder "
                f"holding {MODEL_FILE} and {TAGS_FILE} as SmilingWolf's WD14 repositories ship them."
            )
        return files
    from huggingface_hub import hf_hub_download

    try:
        model, tags = (Path(hf_hub_download(source, name)) for name in (MODEL_FILE, TAGS_FILE))
    except Exception as exc:  # hub errors come in many types; all mean "could not fetch"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise GenerationError(
            f"describe.tagger = {source!r}: could not fetch {MODEL_FILE} and {TAGS_FILE} from the Hugging "
            f"Face Hub ({type(exc).__name__}: {first}); if this machine is offline, download them elsewhere "
            "and set describe.tagger to their folder."
        ) from exc
    return model, tags


class BooruTagger:
    """A WD14 tagger's ONNX session with its labels. Not thread-safe: the describer runs one job at a time."""

    def __init__(self, session: object, labels: list[Label], size: int) -> None:
        self.session, self.labels, self.size = session, labels, size

    @classmethod
    def load(cls, source: str, device: str = "cpu") -> BooruTagger:
        try:
            import onnxruntime
        except ImportError as exc:
            raise GenerationError(
                f"describe.tagger = {source!r} needs onnxruntime ({exc}); install the extra: "
                '`pip install -c requirements.lock -e ".[tagger]"`.'
            ) from exc
        model, tags = tagger_files(source)
        wanted = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
        providers = [p for p in wanted if p in onnxruntime.get_available_providers()] + ["CPUExecutionProvider"]
        try:
            session = onnxruntime.InferenceSession(str(model), providers=providers)
            labels = read_labels(tags)
        except Exception as exc:  # onnxruntime's and csv's errors come in many types
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise GenerationError(
                f"describe.tagger = {source!r} could not be loaded ({type(exc).__name__}: {first}); "
                f"a WD14 tagger's {MODEL_FILE} and {TAGS_FILE} (columns tag_id,name,category,count)."
            ) from exc
        outputs = session.get_outputs()[0].shape[-1]
        if outputs != len(labels):
            raise GenerationError(
                f"describe.tagger = {source!r}: the model has {outputs} outputs but {TAGS_FILE} "
                f"{len(labels)} tags; give the two files of one tagger."
            )
        _batch, height, width, _channels = session.get_inputs()[0].shape
        size = height if isinstance(height, int) and height == width else INPUT_SIZE
        return cls(session, labels, size)

    def scores(self, image: Image.Image) -> np.ndarray:
        """One sigmoid score per label."""
        inputs = {self.session.get_inputs()[0].name: prepare_image(image, self.size)}
        return self.session.run(None, inputs)[0][0]
