"""SDXL end to end: the real bot client against the Discord emulator with the tiny SDXL
single-file model. The size choices synced to Discord are ``generation.sdxl_sizes`` (not
``generation.sizes``), the default size is the first of them, and a posted PNG's metadata names
the model and the size asked for."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from PIL import Image

from bot_harness import bot_config, bot_running, is_result, new_queue
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.config.settings import ConfigError, GenerationSettings, parse_engine_sections
from engine.metadata import read_parameters

SDXL_SIZES = ("64x64", "64x128")  # small for speed: the tiny model has latent scale 8


@pytest.fixture
def sdxl_setup(tiny_sdxl_model, tiny_sdxl_single_file, tmp_path, emulator: Emulator):
    """The emulator, the harness's small config on the tiny SDXL file, and a worker on the model."""
    from engine.serving.worker import EngineWorker

    config = bot_config(str(tiny_sdxl_single_file), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    config = replace(
        config,
        model=replace(config.model, name=tiny_sdxl_model.info.name),
        generation=replace(config.generation, sdxl_sizes=SDXL_SIZES),
    )
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    # As bot/__main__.py does: the worker's limits follow the loaded model's family.
    worker = EngineWorker(tiny_sdxl_model, config.engine, config.generation.for_family(tiny_sdxl_model.info.family))
    worker.start()
    yield emulator, config, queue, worker
    worker.stop()
    engine.dispose()


def size_option_choices(emu: Emulator, command: str) -> list[str]:
    option = next(o for o in emu.command(command)["options"] if o["name"] == "size")
    return [choice["value"] for choice in option["choices"]]


@pytest.mark.asyncio
async def test_imagine_on_sdxl_offers_sdxl_sizes_and_posts_a_png_naming_the_model(sdxl_setup, tiny_sdxl_model):
    emu, config, queue, worker = sdxl_setup
    assert tiny_sdxl_model.info.family == "sdxl" and len(tiny_sdxl_model.text_encoders) == 2
    assert config.generation.sizes != SDXL_SIZES  # the SD1 list is configured too; SDXL's is offered
    async with bot_running(emu, config, queue, worker, model_family=tiny_sdxl_model.info.family) as bot:
        assert size_option_choices(emu, "imagine") == list(SDXL_SIZES)
        assert size_option_choices(emu, "img2img") == list(SDXL_SIZES)
        gen = bot.config.generation
        assert (gen.default_width, gen.default_height) == (64, 64)  # the first SDXL size
        assert (
            f"default {gen.default_width}x{gen.default_height}"
            in next(o for o in emu.command("imagine")["options"] if o["name"] == "size")["description"]
        )

        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse at dusk", "seed": 5, "size": "64x128"})
        assert await ix.wait_ack() == 5
        posted = await emu.wait_for_message(emu.general, is_result, timeout=60)
        data = posted.attachments[0].data
        assert Image.open(io.BytesIO(data)).size == (64, 128)
        params = read_parameters(data)
        assert params["Model"] == tiny_sdxl_model.info.name == config.model.display_name
        assert params["Size"] == "64x128" and params["Seed"] == "5"
        job = queue.get(int(params["job_id"]))
        assert (job.width, job.height) == (64, 128)

        # Left out, the size is SDXL's default (the first of sdxl_sizes).
        await emu.slash(emu.alice, "imagine", {"prompt": "a quiet harbour", "seed": 6})
        second = await emu.wait_for_message(emu.general, lambda m: is_result(m) and m.id != posted.id, timeout=60)
        assert read_parameters(second.attachments[0].data)["Size"] == "64x64"


@pytest.mark.asyncio
async def test_without_an_engine_the_family_is_read_from_the_file(tiny_sdxl_single_file, tmp_path, emulator: Emulator):
    """No engine here (family as configured: auto): an SDXL file's tensor names say SDXL, so the
    commands offer ``sdxl_sizes``; a hub id cannot be read without fetching it: ``sizes``."""
    config = bot_config(str(tiny_sdxl_single_file), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    config = replace(config, generation=replace(config.generation, sdxl_sizes=SDXL_SIZES))
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    try:
        async with bot_running(emulator, config, queue, None) as bot:
            assert size_option_choices(emulator, "imagine") == list(SDXL_SIZES)
            assert bot.config.generation.family == "sdxl"
        hub = replace(config, model=replace(config.model, source="someone/some-model"))
        async with bot_running(emulator, hub, queue, None) as bot:
            assert bot.config.generation.sizes == config.generation.sizes
    finally:
        engine.dispose()


def test_sdxl_sizes_setting():
    gen = GenerationSettings()
    plain = replace(gen, family="", pixel_multiple=8)  # what for_family derives, left out
    assert replace(gen.for_family("sd1"), family="") == plain and gen.for_family("auto") is gen
    assert replace(gen.for_family("sd2"), family="") == plain
    xl = gen.for_family("sdxl")
    assert xl.sizes == ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216")
    assert (xl.default_width, xl.default_height, xl.max_width, xl.max_height) == (1024, 1024, 1216, 1216)
    # The maxima are raised to fit, never lowered.
    big = replace(gen, max_width=2048, sdxl_sizes=("768x1344",)).for_family("sdxl")
    assert (big.default_width, big.default_height, big.max_width, big.max_height) == (768, 1344, 2048, 1344)

    settings = parse_engine_sections({"generation": {"sdxl_sizes": ["640x1536", "1536x640"]}})
    assert settings.generation.sdxl_sizes == ("640x1536", "1536x640")
    for bad, words in (
        ([], "1 to 25 sizes"),
        (["1024x1000x2"], "WIDTHxHEIGHT"),
        (["1020x1024"], "multiples of 8"),
        (["4104x1024"], "4096x4096"),
        ([1024], "WIDTHxHEIGHT"),
        (["64x64"] * 26, "1 to 25"),
    ):
        with pytest.raises(ConfigError, match="generation.sdxl_sizes") as error:
            parse_engine_sections({"generation": {"sdxl_sizes": bad}})
        assert words in str(error.value)
