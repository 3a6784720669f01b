"""The image check's CPU cost per 512x512 image (issue 24), with a ViT-base classifier.

No weights can be downloaded here, so the model is ViT-base/16 at 224x224 (the shape of the
common NSFW classifiers on the Hugging Face Hub: 86 M parameters) with random weights, saved
with ``save_pretrained`` and loaded the way the bot loads ``safety.classifier``. Random weights
cost what trained ones do. Each 512x512 PNG goes the whole way: decoded, resized to 224 by the
model's image processor, classified.

The baseline, in the same run, is encoding the same 512x512 image as a PNG (what the engine's
finishing pool does for every image): the ratio says what the check adds per image on this
machine, whatever its speed.

    .venv/bin/python bench/classifier.py            # batches of 1 and 8, 3 rounds each
    .venv/bin/python bench/classifier.py --threads 1
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engine.torch_builds import torchvision_importable  # noqa: E402

torchvision_importable()
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor  # noqa: E402

from bot.safety.classifier import ImageClassifier  # noqa: E402


def vit_base(folder: Path) -> None:
    config = ViTConfig(id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})  # ViT-base/16, 224
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)


def photo_like(seed: int) -> bytes:
    """A 512x512 PNG of smooth noise (compresses like a picture, not like a flat colour)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((512, 512), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def timed(run, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        vit_base(Path(tmp))
        classifier = ImageClassifier.load(tmp, batch_size=8)
    params = sum(p.numel() for p in classifier.model.parameters()) / 1e6
    pngs = [photo_like(i) for i in range(8)]
    pixels = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    classifier.classify(pngs[:2])  # warm-up

    def encode_all() -> None:
        for image in pixels:
            image.save(io.BytesIO(), format="PNG")

    encode = timed(encode_all, args.rounds) / len(pngs)
    print(f"ViT-base/16 224 ({params:.0f} M parameters), {torch.get_num_threads()} torch thread(s), 512x512 PNGs")
    print(f"baseline: PNG encoding of one 512x512 image: {encode * 1000:.1f} ms")
    for batch in (1, 8):
        classifier.batch_size = batch
        per_image = timed(lambda: classifier.classify(pngs), args.rounds) / len(pngs)
        ratio = per_image / encode
        print(f"classify, batches of {batch}: {per_image * 1000:.1f} ms per image ({ratio:.1f}x the PNG encoding)")


if __name__ == "__main__":
    main()
