"""The SD families' latents per sampler on the tiny models: what the seam must not change.

``python tests/sd_pixels.py OUT.npz`` writes them; ``tests/data/sd_before_seam.npz`` was written
this way by the code as it was before the model-family seam (commit 40bef5b), and
``tests/test_families_seam.py`` compares today's code with it.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from engine.torch_builds import torchvision_importable
from tinymodel import save_diffusers_folder, save_single_file

torchvision_importable()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engine.batching.batch import Batch  # noqa: E402
from engine.families.loading import load_model  # noqa: E402
from engine.params import SAMPLER_NAMES  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.types import GenerationRequest  # noqa: E402


def init_png() -> bytes:
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jobs() -> dict[str, GenerationRequest]:
    base = dict(prompt="a (red:1.2) fox", negative_prompt="blurry", seed=11, steps=5, width=64, height=64)
    out = {sampler: GenerationRequest.of(1, **base, sampler=sampler) for sampler in SAMPLER_NAMES}
    out["img2img"] = GenerationRequest.of(1, **base, sampler="euler_a", init_image=init_png(), strength=0.6)
    out["variation"] = GenerationRequest.of(
        1, **base, sampler="dpmpp_2m", variation_seed=3, variation_strength=0.4, count=2
    )
    return out


def latents(pipeline: Pipeline, request: GenerationRequest) -> np.ndarray:
    job = pipeline.prepare(request)
    batch = Batch(pipeline.denoiser)
    batch.add(job)
    while not batch.entries[0].done:
        batch.step()
    return batch.remove(job).numpy()


def models(folder: Path) -> dict[str, Path]:
    return {
        "sd1": save_diffusers_folder(folder / "sd1", "sd1"),
        "sd2": save_single_file(folder / "sd2.safetensors", "sd2"),
        "sdxl": save_single_file(folder / "sdxl.safetensors", "sdxl"),
    }


def family_latents(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    out = {}
    for family, path in paths.items():
        pipeline = Pipeline(load_model(str(path), device="cpu", dtype=torch.float32, progress=False))
        for name, request in jobs().items():
            out[f"{family}/{name}"] = latents(pipeline, request)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(sys.argv[1], **family_latents(models(Path(tmp))))
