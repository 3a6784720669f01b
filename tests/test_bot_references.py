"""/imagine with a reference image (issue 22) end to end against the Discord emulator: a mode becomes
a ControlNet unit of the model, the PNG says so as A1111's ControlNet extension does, /info shows
it; modes that cannot be used, modes a server turned off and hostile uploads are refused."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from bot_harness import bot_config, bot_running, is_result, png, running_setup
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.control_units import units_from_column
from engine.features.annotators import control_map
from engine.metadata import read_parameters

pytestmark = pytest.mark.asyncio


@pytest.fixture
def reference_setup(tiny_model, tiny_sd_folder, tmp_path, emulator: Emulator):
    from tinycontrolnet import save_controlnets

    folder = tmp_path / "controlnets"
    save_controlnets(folder, tiny_model.unet, {"control_tiny_canny": 1, "control_tiny_tile": 2})
    config = bot_config(str(tiny_sd_folder), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    config = replace(config, model=replace(config.model, controlnet_dir=str(folder)))
    model = dataclasses.replace(tiny_model, controlnet_dir=folder)
    with running_setup(emulator, config, model, tmp_path) as parts:
        yield parts


def blocks() -> bytes:
    pixels = np.kron(np.random.default_rng(3).integers(0, 255, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


async def reply(ix) -> str:
    return (await ix.wait_response(lambda m: m.ephemeral)).content


async def test_imagine_with_a_reference_is_guided_by_its_controlnet(reference_setup):
    emu, config, queue, worker = reference_setup
    async with bot_running(emu, config, queue, worker):
        upload = emu.attachment("ref.png", blocks(), "image/png")
        options = {"prompt": "a house", "seed": 3, "reference_mode": "edges", "reference_strength": 0.8}
        ix = await emu.slash(emu.alice, "imagine", options, attachments={"reference": upload})
        preview = await ix.wait_response(lambda m: m.ephemeral and m.attachments)
        assert "as the ControlNet sees it (canny for control_tiny_canny)" in preview.content
        assert preview.attachments[0].filename == "control-map-0.png"
        posted = await emu.wait_for_message(emu.general, is_result, timeout=60)
        params = read_parameters(posted.attachments[0].data)
        unit = params["ControlNet 0"]
        assert unit.startswith("Module: canny, Model: control_tiny_canny") and "Weight: 0.8" in unit
        job_id = int(next(c for c in posted.custom_ids if c.startswith("sd:reroll:")).split(":")[2])
        (unit,) = units_from_column(queue.get(job_id).control_units)  # the upload as load_init_image made it
        edges = control_map(Image.open(io.BytesIO(unit.image)), "canny", 64, 64, "Crop and Resize")
        shown = Image.open(io.BytesIO(preview.attachments[0].data))
        assert np.array_equal(np.asarray(shown), np.asarray(edges)) and np.asarray(edges).any()
        assert r"ControlNet 0:** control\_tiny\_canny (canny), weight 0.8, Balanced" in await reply(
            await emu.slash(emu.alice, "info", {"job": job_id})
        )
        await emu.wait_for(lambda: "done" in ix.original.content, timeout=10, what="status done")


async def test_references_that_cannot_be_used_are_refused_with_what_can(reference_setup):
    emu, config, queue, _ = reference_setup
    async with bot_running(emu, config, queue, None):

        async def ask(mode: str | None, upload=None) -> str:
            options = {"prompt": "a house"} | ({"reference_mode": mode} if mode else {})
            upload = upload or emu.attachment("ref.png", blocks(), "image/png")
            return await reply(await emu.slash(emu.alice, "imagine", options, attachments={"reference": upload}))

        assert "The depth reference needs the depth annotator, which is not installed; " in await ask("depth")
        assert "reference modes you can use here: edges, tile, blur." in await ask("depth")
        # A TIFF sent as a PNG, and one over the size cap: refused as /img2img's uploads are.
        assert "could not be read as an image" in await ask(
            "edges", emu.attachment("r.png", png(fmt="TIFF"), "image/png")
        )
        big = emu.attachment("big.png", png((64, 64)) + b"\0" * (300 * 1024), "image/png", size=1000)
        assert "larger than 0.2 MiB" in await ask("tile", big)
        # A server's managers turn a mode off; members are told which they can use.
        shown = await reply(await emu.slash(emu.admin, "server references", {"mode": "tile", "on": False}))
        assert "reference modes turned off: tile" in shown
        refused = await ask("tile")
        assert (
            "This server has turned the tile reference off; reference modes you can use here: edges, blur." in refused
        )
        await reply(await emu.slash(emu.admin, "server references", {"mode": "tile", "on": True}))
        assert (
            "queued"
            in (
                await (
                    await emu.slash(
                        emu.alice,
                        "imagine",
                        {"prompt": "a house", "reference_mode": "tile"},
                        attachments={"reference": emu.attachment("ref.png", blocks(), "image/png")},
                    )
                ).wait_response(lambda m: "queued" in m.content)
            ).content
        )
    assert [job.prompt for job in queue.pending_for(emu.alice.id)] == ["a house"]


def test_a_journaled_job_keeps_its_control_units():
    """A job acknowledged before it was stored is queued from the journal with its units."""
    import json
    from datetime import UTC, datetime

    from bot.journal import Entry, Request, _decode, _encode
    from db.models import JobKind
    from engine.control_units import CONTROL_MODES, ControlUnit
    from engine.params import GenerationParams

    units = (ControlUnit("control_tiny_canny", b"\x89PNG bytes", "canny", 0.7, 0.1, 0.9, CONTROL_MODES[2]),)
    for params in (GenerationParams("a house", 3, control_units=units), GenerationParams("a house", 3)):
        request = Request(JobKind.txt2img, params, None, 1, 2, 3)
        entry = Entry(1, 2, "token", datetime(2026, 12, 7, tzinfo=UTC), request)
        assert _decode(json.loads(_encode(entry))).request.params == params


async def test_a_flagged_reference_is_refused_before_any_job_is_stored(tiny_model, tmp_path, emulator):
    """The image filter judges a reference as it judges an /img2img upload."""
    from bot.safety.settings import SafetySettings
    from bot_harness import new_queue
    from tiny_classifier import save_tiny_classifier
    from tinycontrolnet import save_controlnets

    save_controlnets(tmp_path / "controlnets", tiny_model.unet, {"control_tiny_canny": 1})
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    config = replace(
        config,
        model=replace(config.model, controlnet_dir=str(tmp_path / "controlnets")),
        safety=SafetySettings(classifier=str(save_tiny_classifier(tmp_path / "nsfw", "nsfw")), mode="blur"),
    )
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    try:
        async with bot_running(emulator, config, queue, None):
            upload = emulator.attachment("ref.png", blocks(), "image/png")
            ix = await emulator.slash(emulator.alice, "imagine", {"prompt": "a cat"}, attachments={"reference": upload})
            assert (await reply(ix)) == (
                "Your image was flagged by this server's image filter (nsfw 100%); use it in an age-restricted channel."
            )
        assert queue.pending_for(emulator.alice.id) == []
    finally:
        engine.dispose()
