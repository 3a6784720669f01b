"""Upscaler models through spandrel (engine/features/upscalers.py), on tiny random-weight Real-ESRGAN
compact networks saved as real .pth and .safetensors files, and their config checks."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config.toml_config import ConfigError
from engine.config.upscaler_settings import LANCZOS, UpscalerSettings, parse_upscalers
from engine.errors import GenerationError
from engine.features.upscalers import Upscalers, cells, upscale_tiled
from tinyupscaler import RECEPTIVE_RADIUS, compact, save_pth, upscaler_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return upscaler_folder(tmp_path_factory.mktemp("upscalers"))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def test_models_load_by_name_with_their_own_scale(folder):
    upscalers = Upscalers(folder)
    assert {"tiny-2x", "tiny-4x"} <= set(upscalers.names())
    assert upscalers.scale_of("tiny-2x") == 2  # the .pth
    assert upscalers.scale_of("tiny-4x") == 4  # the .safetensors
    assert upscalers.scale_of(LANCZOS) == 1


def test_the_output_has_the_requested_size(folder):
    upscalers, image = Upscalers(folder), noise_image(40, 24)
    assert upscalers.upscale(image, "tiny-2x", 2).size == (80, 48)
    assert upscalers.upscale(image, "tiny-4x", 2).size == (80, 48)  # 4x, then Lanczos down to 2x
    assert upscalers.upscale(image, "tiny-2x", 3).size == (120, 72)  # 2x twice, then Lanczos down
    assert upscalers.upscale(image, LANCZOS, 1.5).size == (60, 36)
    assert upscalers.upscale_to(image, "tiny-2x", (88, 48)).size == (88, 48)  # a job's multiple of 8


def test_a_model_at_its_own_scale_is_the_network_itself(folder):
    """No resize after a model whose scale is the one asked for: the pixels are the network's."""
    spandrel_state = compact(2, seed=1)
    image = noise_image(32, 16)
    out = np.asarray(Upscalers(folder).upscale(image, "tiny-2x", 2), dtype=np.float32)
    from spandrel.architectures.Compact import Compact

    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=1, upscale=2)
    net.load_state_dict(spandrel_state)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = (net(x).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(out - expected).max() <= 1


def test_tiles_give_the_untiled_image(folder):
    model = Upscalers(folder)._model("tiny-2x")
    pixels = torch.rand(1, 3, 90, 70, generator=torch.Generator().manual_seed(3))
    whole = model(pixels)
    overlap = 2 * RECEPTIVE_RADIUS + 2  # more context around each cell than the network looks at
    tiled = upscale_tiled(model, pixels, tile=32, overlap=overlap)
    assert tiled.shape == whole.shape == (1, 3, 180, 140)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    # Without the overlap the seams show: the check above can fail.
    assert (upscale_tiled(model, pixels, tile=32, overlap=0) - whole).abs().max() > 1e-2


def test_cells_cover_the_image_once_and_tiles_stay_within_the_tile_size():
    for length, tile, overlap in [(90, 32, 8), (1000, 512, 32), (513, 512, 0), (100, 100, 50), (33, 32, 16)]:
        parts = cells(length, tile, overlap)
        assert parts[0][0] == 0 and parts[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
        assert all(t1 - t0 <= tile and t0 <= a and b <= t1 for a, b, t0, t1 in parts)
        assert all(min(a - t0, overlap // 2) == overlap // 2 or t0 == 0 for a, b, t0, t1 in parts)


def test_large_images_are_tiled_through_upscale(folder):
    small_tiles = Upscalers(folder, tile=32, overlap=2 * RECEPTIVE_RADIUS + 2)
    image = noise_image(72, 56, seed=5)
    tiled = np.asarray(small_tiles.upscale(image, "tiny-2x", 2), dtype=np.int16)
    whole = np.asarray(Upscalers(folder, tile=512).upscale(image, "tiny-2x", 2), dtype=np.int16)
    assert np.abs(tiled - whole).max() <= 1  # rounding to 8 bits only


def test_models_that_are_not_super_resolution_are_refused_clearly(folder, caplog):
    upscalers = Upscalers(folder)
    with caplog.at_level(logging.WARNING, logger="engine.features.upscalers"):
        with pytest.raises(GenerationError, match=r"'denoise-1x' is a Restoration model .*1x\), not an image upscaler"):
            upscalers.upscale(noise_image(8, 8), "denoise-1x", 2)
        with pytest.raises(GenerationError, match="'not-an-upscaler' is not a model spandrel can load"):
            upscalers.scale_of("not-an-upscaler")
    lines = [r.getMessage() for r in caplog.records]
    assert any("denoise-1x" in line and "not image super-resolution; refused" in line for line in lines)
    assert any("not-an-upscaler" in line and "spandrel" in line for line in lines)
    assert set(upscalers.names()) == {"tiny-2x", "tiny-4x"}  # the refused ones are no longer offered


def test_an_unknown_name_lists_what_there_is(folder):
    with pytest.raises(GenerationError, match=r"No upscaler named 'nope' here; available: Lanczos, .*tiny-2x"):
        Upscalers(folder).scale_of("nope")


def test_at_most_two_models_stay_loaded(tmp_path):
    for seed in range(3):
        save_pth(compact(2, seed=seed), tmp_path / f"m{seed}.pth")
    upscalers = Upscalers(tmp_path)
    for name in ("m0", "m1", "m2"):
        upscalers.scale_of(name)
    assert list(upscalers._loaded) == ["m1", "m2"]


def test_the_engine_dtype_is_used_where_the_architecture_supports_it(folder):
    image = noise_image(24, 16, seed=2)
    bf16 = Upscalers(folder, dtype=torch.bfloat16)
    assert bf16._model("tiny-2x").dtype == torch.bfloat16  # Compact supports bfloat16
    out = np.asarray(bf16.upscale(image, "tiny-2x", 2), dtype=np.int16)
    full = np.asarray(Upscalers(folder).upscale(image, "tiny-2x", 2), dtype=np.int16)
    assert np.abs(out - full).mean() < 4


def test_the_default_model_is_loaded_at_start(folder):
    settings = parse_upscalers({"upscalers": {"folder": str(folder), "default": "tiny-4x"}})
    assert Upscalers.configured(settings, torch.device("cpu"), torch.float32)._loaded.keys() == {"tiny-4x"}
    refused = UpscalerSettings(folder=str(folder), default="denoise-1x")
    with pytest.raises(ConfigError, match="upscalers.default = 'denoise-1x': .*not an image upscaler"):
        Upscalers.configured(refused, torch.device("cpu"), torch.float32)


# -- [upscalers] in config.toml ---------------------------------------------------------------------


@pytest.fixture
def names(tmp_path) -> Path:
    """A folder whose files the settings list by name (they are not read: no spandrel needed)."""
    folder = tmp_path / "models"
    folder.mkdir()
    for file in ("tiny-2x.pth", "tiny-4x.safetensors", "denoise-1x.pth", "notes.txt"):
        (folder / file).write_bytes(b"")
    return folder


def test_upscaler_settings_default_to_lanczos_without_a_folder(tmp_path, names):
    assert parse_upscalers({}) == UpscalerSettings()
    assert UpscalerSettings().default_upscaler() == LANCZOS
    assert UpscalerSettings(folder=str(tmp_path / "empty")).default_upscaler() == LANCZOS
    assert UpscalerSettings(folder=str(names)).default_upscaler() == "denoise-1x"  # the first by name
    assert UpscalerSettings(folder=str(names), default="tiny-2x").default_upscaler() == "tiny-2x"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"default": "tiny-2x"}, "upscalers.default = 'tiny-2x': set upscalers.folder"),
        ({"default": "nope"}, r"upscalers.default = 'nope': not allowed; a model file name .*tiny-2x"),
        ({"overlap": 300}, r"upscalers.overlap = 300: not allowed; 0 to half of upscalers.tile \(256\)"),
        ({"tile": 8}, "upscalers.tile = 8: not allowed; 32 to 4096"),
        ({"tile": "big"}, "upscalers.tile = 'big': expected int"),
        ({"size": 4}, "upscalers.size: unknown key"),
    ],
)
def test_wrong_upscaler_settings_stop_the_start_with_one_line(names, table, message):
    if "default" in table and table["default"] == "nope":
        table = {**table, "folder": str(names)}
    with pytest.raises(ConfigError, match=message):
        parse_upscalers({"upscalers": table})


def test_a_file_is_not_an_upscaler_folder(names):
    with pytest.raises(ConfigError, match="upscalers.folder = .*not a file"):
        parse_upscalers({"upscalers": {"folder": str(names / "tiny-2x.pth")}})


def test_the_hires_fix_enlarges_with_an_upscaler_model(folder, tiny_model):
    """A hires job names a model of the folder as its upscaler: the engine accepts it, and the
    second pass starts from the model's image (not Lanczos's)."""
    from engine.batching.admission import over_limits
    from engine.config.settings import EngineSettings, GenerationSettings
    from engine.features.hires import upscale_image
    from engine.params import GenerationParams
    from engine.serving.worker import EngineWorker
    from engine.types import GenerationRequest

    upscalers, image = Upscalers(folder), noise_image(32, 32)
    by_model = upscale_image(image, 64, 64, "tiny-2x", upscalers)
    assert by_model.tobytes() == upscalers.upscale(image, "tiny-2x", 2).tobytes()
    assert by_model.tobytes() != upscale_image(image, 64, 64, "Lanczos").tobytes()
    params = GenerationParams(prompt="a fox", seed=3, steps=2, width=64, height=64, hires_scale=2.0)
    params = params.but(hires_upscaler="tiny-2x")
    gen = GenerationSettings()
    assert "unknown hires upscaler" in over_limits(params, gen)  # without the folder: refused
    assert over_limits(params, gen, upscalers.names()) is None
    worker = EngineWorker(tiny_model, EngineSettings(preview_every=0), gen, upscalers=upscalers)
    worker.start()
    try:
        result = worker.generate_blocking(GenerationRequest(1, params))
    finally:
        worker.stop()
    with Image.open(io.BytesIO(result.images[0].png)) as made:
        assert made.size == (128, 128)
    assert "Hires upscaler: tiny-2x" in result.infotext
