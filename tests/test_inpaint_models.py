"""Inpainting checkpoints (9-channel UNets) in every format we load, and checkpoints we refuse.

Tiny random-weight models (tests/tinymodel.py) written as diffusers folders and as LDM-layout
single files: they load with all their weights, run plain txt2img and masked jobs, and a masked
job on them batches with other jobs. UNets of other input widths than 4, 8 (InstructPix2Pix,
tests/test_instruct_edit.py) and 9, and SDXL refiners, are refused at load with a message that
names the file and says what it is.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.batching.batch import Batch
from engine.errors import ModelLoadError
from engine.families.loading import load_model
from engine.features.masks import feather_reach
from engine.pipeline import Pipeline
from engine.types import GenerationRequest
from tinymodel import build_tiny_components, save_diffusers_folder, save_single_file
from tolerance import assert_same_image, image_array

FORMATS = [("folder", "sd1"), ("folder", "sdxl"), ("file", "sd1"), ("file", "sd2"), ("file", "sdxl")]
HOLE = (16, 16, 40, 40)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def init_image() -> Image.Image:
    rng = np.random.default_rng(9)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")


def hole_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, HOLE)
    return mask


def write(tmp_path, form: str, family: str, in_channels: int):
    if form == "folder":
        return save_diffusers_folder(tmp_path / f"{family}_{in_channels}", family, in_channels=in_channels)
    return save_single_file(tmp_path / f"{family}_{in_channels}.safetensors", family, in_channels=in_channels)


def load(path, **kwargs):
    return load_model(str(path), device="cpu", dtype=torch.float32, progress=False, **kwargs)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inpainting_models")


def assert_same_unet(model, family: str, in_channels: int) -> None:
    """Every UNet tensor came from the file (no silently random-initialised one)."""
    expected = build_tiny_components(family, in_channels=in_channels)["unet"].state_dict()
    loaded = model.unet.state_dict()
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(loaded[key], tensor, msg=key)


@pytest.mark.parametrize(("form", "family"), FORMATS)
def test_inpainting_checkpoints_load_and_generate_in_every_format(models_dir, form, family):
    model = load(write(models_dir, form, family, 9))
    assert model.info.inpainting and model.unet.config.in_channels == 9
    assert_same_unet(model, family, 9)
    pipeline = Pipeline(model)
    plain = pipeline.generate(GenerationRequest.of(1, prompt="a fox", seed=1, steps=3, width=64, height=64))
    assert image_array(plain.images[0].png).std() > 0
    masked = pipeline.generate(
        GenerationRequest.of(
            2,
            prompt="a fox",
            seed=1,
            steps=3,
            width=64,
            height=64,
            init_image=png(init_image()),
            mask=png(hole_mask()),
            strength=1.0,
            mask_blur=2,
        )
    )
    out, init = image_array(masked.images[0].png), image_array(init_image())
    keep = np.ones((64, 64), dtype=bool)
    reach = feather_reach(2)
    keep[HOLE[1] - reach : HOLE[3] + reach, HOLE[0] - reach : HOLE[2] + reach] = False
    assert np.array_equal(out[keep], init[keep])
    assert not np.array_equal(out[~keep], init[~keep])


def test_an_inpainting_file_next_to_a_plain_config_is_read_by_its_own_channels(models_dir):
    # The shipped config folders are plain SD models: the file's header decides the UNet's width.
    path = save_single_file(models_dir / "plain_config.safetensors", "sd1", in_channels=9)
    config = path.with_suffix("") / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"in_channels": 4}))
    model = load(path)
    assert model.info.inpainting
    assert_same_unet(model, "sd1", 9)


def test_plain_checkpoints_are_not_inpainting_ones(tiny_model):
    assert not tiny_model.info.inpainting


def test_the_mask_and_masked_image_reach_the_inpainting_unet(models_dir):
    pipeline = Pipeline(load(write(models_dir, "file", "sd1", 9)))
    request = GenerationRequest.of(
        1,
        prompt="a fox",
        seed=1,
        steps=3,
        width=64,
        height=64,
        init_image=png(init_image()),
        mask=png(hole_mask()),
        strength=0.8,
    )
    job = pipeline.prepare(request)
    assert job.blend is None  # the UNet is told where to paint instead
    mask, image_latents = job.cond.image[:, :1], job.cond.image[:, 1:]
    assert mask.shape == (1, 1, 8, 8) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0, 3, 3] == 1 and mask[0, 0, 0, 0] == 0
    grey = Image.new("RGB", (64, 64), (127, 127, 127))
    unmasked = pipeline.prepare(GenerationRequest.of(2, prompt="a fox", seed=1, steps=3, width=64, height=64))
    assert bool((unmasked.cond.image[:, :1] == 1).all())  # txt2img: paint everywhere, on a grey image
    torch.testing.assert_close(unmasked.cond.image[:, 1:], pipeline.encode_image(grey))
    assert not torch.allclose(image_latents, pipeline.encode_image(grey))


def test_a_masked_job_on_an_inpainting_model_batches_with_others(models_dir):
    pipeline = Pipeline(load(write(models_dir, "file", "sd1", 9)))
    requests = [
        GenerationRequest.of(
            1,
            prompt="a fox",
            seed=1,
            steps=4,
            width=64,
            height=64,
            init_image=png(init_image()),
            mask=png(hole_mask()),
            strength=0.9,
            count=2,
        ),
        GenerationRequest.of(2, prompt="a boat", seed=5, steps=3, width=64, height=64, sampler="euler"),
        GenerationRequest.of(
            3, prompt="a tree", seed=6, steps=5, width=64, height=64, init_image=png(init_image()), strength=0.6
        ),
    ]
    batch = Batch(pipeline.denoiser)
    for request in requests:
        batch.add(pipeline.prepare(request))
    together = {}
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            images = pipeline.decode(batch.remove(entry.job))
            together[entry.job.request.job_id] = pipeline.finish(entry.job, images)
    for request in requests:
        alone = pipeline.generate(request)
        for a, b in zip(together[request.job_id].images, alone.images, strict=False):
            assert_same_image(a.png, b.png)


@pytest.mark.parametrize("form", ["folder", "file"])
def test_unets_of_other_input_widths_are_refused_by_their_width(models_dir, form):
    path = write(models_dir, form, "sd1", 7)
    with pytest.raises(ModelLoadError, match="a model whose UNet takes 7 input channels") as refused:
        load(path)
    assert str(path) in str(refused.value) and "InstructPix2Pix (8 channels)" in str(refused.value)


def test_an_sdxl_refiner_file_is_refused_by_name(models_dir):
    # A refiner keeps only SDXL's second text encoder, as embedder 0.
    base = save_single_file(models_dir / "base.safetensors", "sdxl")
    state = {
        key.replace("conditioner.embedders.1.", "conditioner.embedders.0."): tensor
        for key, tensor in load_file(base).items()
        if not key.startswith("conditioner.embedders.0.")
    }
    refiner = models_dir / "refiner.safetensors"
    save_file(state, refiner)
    with pytest.raises(ModelLoadError, match="an SDXL refiner") as refused:
        load(refiner)
    assert str(refiner) in str(refused.value) and "text encoder" not in str(refused.value)


def test_an_sdxl_refiner_folder_is_refused_by_name(models_dir):
    folder = save_diffusers_folder(models_dir / "refiner_folder", "sdxl")
    shutil.rmtree(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ModelLoadError, match="an SDXL refiner"):
        load(folder)


def test_an_sdxl_file_with_a_v_pred_key_is_v_prediction(models_dir):
    path = save_single_file(models_dir / "vpred.safetensors", "sdxl")
    assert load(path).info.prediction_type == "epsilon"
    save_file(load_file(path) | {"v_pred": torch.tensor([])}, path)
    assert load(path).info.prediction_type == "v_prediction"
    assert load(path, prediction_type="epsilon").info.prediction_type == "epsilon"  # an explicit setting wins


def test_an_sd2_inpainting_file_with_the_shipped_config_is_the_512_epsilon_model(models_dir, monkeypatch):
    # The shipped SD2 config is 768-v; Stability's SD 2 inpainting model is 512 px epsilon. A
    # shipped-config folder that fits the tiny model stands in for engine/data.
    path = save_single_file(models_dir / "sd2_inpainting.safetensors", "sd2", in_channels=9)
    data = models_dir / "data"
    shutil.copytree(path.with_suffix(""), data / "sd2")
    shutil.rmtree(path.with_suffix(""))
    for folder in (data / "sd2" / "unet", data / "sd2" / "scheduler"):  # as the shipped one: plain, 768-v
        config = next(folder.glob("*.json"))
        changes = (
            {"in_channels": 4, "sample_size": 96} if folder.name == "unet" else {"prediction_type": "v_prediction"}
        )
        config.write_text(json.dumps(json.loads(config.read_text()) | changes))
    monkeypatch.setattr("engine.families.loading.DATA_DIR", data)
    model = load(path)
    assert (model.info.inpainting, model.info.prediction_type, model.info.default_size) == (True, "epsilon", 512)
    assert load(path, prediction_type="v_prediction").info.prediction_type == "v_prediction"
