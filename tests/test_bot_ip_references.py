"""/imagine reference_mode:style and subject (issue 22) end to end against the Discord emulator: the
reference goes through the model's IP-Adapter, the PNG names the unit as A1111's extension does,
/info shows it; hostile references are refused as /img2img uploads are; a model without an
IP-Adapter offers neither mode."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import replace

import pytest

from bot_harness import bot_config, bot_running, is_result, png, running_setup
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.control_units import units_from_column
from engine.metadata import read_parameters
from test_bot_references import blocks, reply

pytestmark = pytest.mark.asyncio


@pytest.fixture
def style_setup(tiny_model, tiny_sd_folder, tmp_path, emulator: Emulator):
    from tinyipadapter import save_image_encoder, save_ip_adapter

    save_image_encoder(tmp_path)
    adapter = save_ip_adapter(tmp_path, tiny_model.unet, "ip-adapter_tiny", plus=False, seed=1)
    config = bot_config(str(tiny_sd_folder), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    encoder = tmp_path / "image_encoder"
    config = replace(config, model=replace(config.model, ip_adapter=str(adapter), image_encoder=str(encoder)))
    # The worker's model gets its own UNet: the adapter's processors are installed in it.
    model = dataclasses.replace(
        tiny_model, unet=copy.deepcopy(tiny_model.unet), ip_adapter=adapter, image_encoder=encoder
    )
    with running_setup(emulator, config, model, tmp_path) as parts:
        yield parts


async def test_a_style_reference_runs_through_the_ip_adapter(style_setup):
    emu, config, queue, worker = style_setup
    async with bot_running(emu, config, queue, worker):
        upload = emu.attachment("ref.png", blocks(), "image/png")
        options = {"prompt": "a house", "seed": 3, "reference_mode": "style", "reference_strength": 0.8}
        ix = await emu.slash(emu.alice, "imagine", options, attachments={"reference": upload})
        posted = await emu.wait_for_message(emu.general, is_result, timeout=60)
        unit = read_parameters(posted.attachments[0].data)["ControlNet 0"]
        assert unit.startswith("Module: ip-adapter_style, Model: ip-adapter_tiny [") and "Weight: 0.8" in unit
        job_id = int(next(c for c in posted.custom_ids if c.startswith("sd:reroll:")).split(":")[2])
        (stored,) = units_from_column(queue.get(job_id).control_units)
        assert (stored.model, stored.module, stored.weight) == ("ip-adapter_tiny", "ip-adapter_style", 0.8)
        assert r"IP-Adapter:** ip-adapter\_tiny (ip-adapter_style), weight 0.8" in await reply(
            await emu.slash(emu.alice, "info", {"job": job_id})
        )
        await emu.wait_for(lambda: "done" in ix.original.content, timeout=10, what="status done")


async def test_hostile_style_references_are_refused_as_uploads_are(style_setup):
    emu, config, queue, _ = style_setup
    async with bot_running(emu, config, queue, None):

        async def ask(mode: str, upload) -> str:
            options = {"prompt": "a house", "reference_mode": mode}
            return await reply(await emu.slash(emu.alice, "imagine", options, attachments={"reference": upload}))

        tiff = emu.attachment("r.png", png(fmt="TIFF"), "image/png")
        assert "could not be read as an image" in await ask("style", tiff)
        big = emu.attachment("big.png", png((64, 64)) + b"\0" * (300 * 1024), "image/png", size=1000)
        assert "larger than 0.2 MiB" in await ask("subject", big)
        odd = emu.attachment("`@everyone`\u202e.txt", b"hello", "text/plain")
        assert (await ask("style", odd)).startswith("`'@everyone'.txt` is text/plain") and odd.fetches == 0
        # Without ControlNets this model offers the IP-Adapter's modes only.
        assert "reference modes you can use here: style, subject." in await ask("edges", tiff)
    assert queue.pending_for(emu.alice.id) == []


async def test_use_as_reference_queues_imagine_with_the_message_s_image(style_setup):
    """Apps → Use as reference on any message with an image: a form, then /imagine with it."""
    emu, config, queue, worker = style_setup
    async with bot_running(emu, config, queue, worker):

        async def use(posted, values: dict[str, str]):
            ix = await emu.message_command(emu.bob, "Use as reference", posted)
            assert await ix.wait_ack() == 9  # the form
            return await emu.submit_modal(emu.bob, ix, values)

        posted = emu.post(emu.alice, "look", attachments=(emu.attachment("ref.png", blocks(), "image/png"),))
        form = {"Prompt": "a castle", "Reference mode": "style", "Strength (0 to 2)": "0.5"}
        await (await use(posted, form)).wait_response(lambda m: "queued" in m.content)
        result = await emu.wait_for_message(emu.general, is_result, timeout=60)
        unit = read_parameters(result.attachments[0].data)["ControlNet 0"]
        assert unit.startswith("Module: ip-adapter_style, Model: ip-adapter_tiny [") and "Weight: 0.5" in unit
        job = queue.get(int(next(c for c in result.custom_ids if c.startswith("sd:reroll:")).split(":")[2]))
        assert (job.requester_id, job.prompt) == (emu.bob.id, "a castle")
        # The 📌 Reference button under that one-image result: the same form, with the result's image.
        assert f"sd:ref:{job.id}:0" in result.custom_ids
        press = await emu.click(emu.alice, result, f"sd:ref:{job.id}:0")
        assert await press.wait_ack() == 9
        submitted = await emu.submit_modal(emu.alice, press, form | {"Prompt": "a tower", "Reference mode": "subject"})
        await submitted.wait_response(lambda m: "queued" in m.content)
        second = await emu.wait_for_message(emu.general, lambda m: is_result(m) and m.id != result.id, timeout=60)
        unit = read_parameters(second.attachments[0].data)["ControlNet 0"]
        assert unit.startswith("Module: ip-adapter_clip, Model: ip-adapter_tiny [")
        # Refusals say what to do: a bad strength, a TIFF posing as PNG, a message without an image.
        assert "The strength is a number from 0 to 2" in await reply(
            await use(posted, form | {"Strength (0 to 2)": "9"})
        )
        lying = emu.post(emu.alice, attachments=(emu.attachment("r.png", png(fmt="TIFF"), "image/png"),))
        assert "could not be read as an image" in await reply(await use(lying, form))
        bare = emu.post(emu.alice, "no image here")
        ix = await emu.message_command(emu.bob, "Use as reference", bare)
        assert "That message has no image attached" in await reply(ix)
