"""The U buttons end to end: Upscale (Subtle) and (Creative) through the emulator, the queue and the
engine, with a tiny random-weight upscaler model, and the Lanczos fallback without one."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageOps

from bot_harness import bot_config, bot_running, help_embeds, is_result, running_setup, setup  # noqa: F401 - setup is a fixture
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.config.upscaler_settings import UpscalerSettings
from engine.errors import GenerationError
from engine.features.upscalers import Upscalers
from engine.metadata import read_parameters
from engine.types import GenerationRequest
from tinyupscaler import import_spandrel, upscaler_folder

pytestmark = pytest.mark.asyncio


@pytest.fixture
def with_upscaler(tiny_model, tiny_sd_folder, tmp_path, emulator):
    """Like bot_harness's setup, with ``[upscalers]`` holding the tiny models, tiny-2x the default
    (tiles of 32 pixels: the 64x64 results are tiled)."""
    import_spandrel()
    folder = upscaler_folder(tmp_path / "upscalers")
    upscalers = UpscalerSettings(folder=str(folder), default="tiny-2x", tile=32, overlap=8)
    config = replace(
        bot_config(str(tiny_sd_folder), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id), upscalers=upscalers
    )
    with running_setup(emulator, config, tiny_model, tmp_path) as parts:
        yield parts


def job_of(message) -> int:
    return int(next(cid for cid in message.custom_ids if cid.startswith("sd:reroll:")).split(":")[2])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


async def one_image(emu, prompt: str = "a lighthouse"):
    ix = await emu.slash(emu.alice, "imagine", {"prompt": prompt, "seed": 3})
    await ix.wait_ack()
    return await emu.wait_for_message(emu.general, is_result, timeout=60)


async def upscale(emu, queue, first, mode: str):
    parent = job_of(first)
    await emu.click(emu.bob, first, f"sd:up:{parent}:0:{mode}")

    def made(message) -> bool:
        job = queue.get(job_of(message))
        return job.kind.value == "upscale" and job.upscale_only == (mode == "subtle")

    up = await emu.wait_for_message(emu.general, lambda m: is_result(m) and made(m), timeout=60)
    upscaler = next(f["value"] for e in up.embeds for f in e.get("fields", []) if f["name"] == "Upscaler")
    return queue.get(job_of(up)), up.attachments[0].data, upscaler


async def test_subtle_is_the_upscaler_alone_at_twice_the_size(with_upscaler):
    emu, config, queue, worker = with_upscaler
    async with bot_running(emu, config, queue, worker):
        first = await one_image(emu)
        assert {f"sd:up:{job_of(first)}:0:subtle", f"sd:up:{job_of(first)}:0:creative"} <= set(first.custom_ids)
        job, png, shown = await upscale(emu, queue, first, "subtle")
    assert shown == "tiny-2x, alone (Subtle)"  # the message says which upscaler made it
    assert (job.kind.value, job.requester_id) == ("upscale", emu.bob.id)
    assert (job.upscaler, job.upscale_only) == ("tiny-2x", True)
    assert Image.open(io.BytesIO(png)).size == (128, 128)
    # Exactly the model's output (tiled on the engine, whole here), no diffusion pass over it.
    source = Image.open(io.BytesIO(first.attachments[0].data)).convert("RGB")
    expected = Upscalers(config.upscalers.folder, tile=512).upscale(source, "tiny-2x", 2)
    assert np.abs(pixels(png) - np.asarray(expected, dtype=np.int16)).max() <= 1
    params = read_parameters(png)
    assert params["Postprocess upscaler"] == "tiny-2x" and params["Postprocess upscale by"] == "2"
    assert params["Size"] == "64x64" and "Denoising strength" not in params  # the source's parameters
    assert params["Prompt"] == "a lighthouse" and params["Seed"] == "3"


async def test_creative_runs_img2img_over_the_upscaled_image(with_upscaler):
    emu, config, queue, worker = with_upscaler
    async with bot_running(emu, config, queue, worker):
        first = await one_image(emu)
        _, subtle, _ = await upscale(emu, queue, first, "subtle")
        job, creative, shown = await upscale(emu, queue, first, "creative")
    assert shown == "tiny-2x, then img2img at 0.4 (Creative)"
    assert (job.upscaler, job.upscale_only, job.strength, job.width, job.height) == ("tiny-2x", False, 0.4, 128, 128)
    assert Image.open(io.BytesIO(creative)).size == (128, 128)
    params = read_parameters(creative)
    assert params["Hires upscaler"] == "tiny-2x" and params["Hires upscale"] == "2"
    assert params["Denoising strength"] == "0.4" and params["Size"] == "64x64"
    # The diffusion pass changed the upscaled image.
    assert np.abs(pixels(creative) - pixels(subtle)).mean() > 2


async def test_without_an_upscaler_folder_both_fall_back_to_lanczos(setup):
    emu, config, queue, worker = setup
    assert config.upscalers.folder == ""
    async with bot_running(emu, config, queue, worker):
        first = await one_image(emu, "a barn")
        job, png, shown = await upscale(emu, queue, first, "subtle")
        creative_job, creative, _ = await upscale(emu, queue, first, "creative")
    assert shown == "Lanczos, alone (Subtle)"
    source = Image.open(io.BytesIO(first.attachments[0].data)).convert("RGB")
    lanczos = ImageOps.fit(source, (128, 128), Image.Resampling.LANCZOS)
    assert job.upscaler == "Lanczos" and np.abs(pixels(png) - np.asarray(lanczos, dtype=np.int16)).max() <= 1
    assert read_parameters(png)["Postprocess upscaler"] == "Lanczos"
    assert creative_job.upscaler == "Lanczos" and read_parameters(creative)["Hires upscaler"] == "Lanczos"
    assert Image.open(io.BytesIO(creative)).size == (128, 128)


async def test_an_upscaler_the_worker_lacks_fails_the_job_with_the_names_it_has(with_upscaler):
    emu, config, queue, worker = with_upscaler
    init = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(init, "PNG")
    request = GenerationRequest.of(
        9,
        prompt="x",
        seed=1,
        steps=2,
        width=128,
        height=128,
        init_image=init.getvalue(),
        upscaler="gone",
        upscale_only=True,
    )
    with pytest.raises(GenerationError, match=r"No upscaler named 'gone' here; available: Lanczos, .*tiny-2x"):
        await worker.generate(request)


async def test_help_names_the_upscaler(with_upscaler):
    emu, config, queue, worker = with_upscaler
    async with bot_running(emu, config, queue, worker):
        embeds = await help_embeds(emu)
    text = "\n".join(e["description"] for e in embeds)
    assert "Upscale (Subtle)" in text and "2x by tiny-2x" in text and "strength 0.4" in text
