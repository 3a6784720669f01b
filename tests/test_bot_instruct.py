"""Edit with words (issue 22) end to end against the Discord emulator: where an InstructPix2Pix
model is configured (``discord.edit_model``) every result image has the button; its form's
sentence queues an edit of that image on the edit model for whoever pressed, which the worker runs
and posts; without an edit model there is no button."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from PIL import Image

from bot import layout
from bot_harness import bot_config, bot_running, help_embeds, new_queue
from db.models import Job, JobKind
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.config.settings import ModelSettings
from engine.metadata import read_parameters
from test_bot_edits import job_of, rows_of, wait_result


@pytest.fixture
def edit_setup(tiny_model, tiny_sd_folder, tmp_path, emulator: Emulator):
    from engine.families.loading import load_model
    from engine.serving.models import ModelPool
    from engine.serving.worker import EngineWorker
    from tinymodel import save_diffusers_folder

    folder = save_diffusers_folder(tmp_path / "ip2p", "sd1", seed=5, in_channels=8)
    edit_model = load_model(str(folder), device="cpu", dtype=torch.float32, name="ip2p", progress=False)
    config = bot_config(str(tiny_sd_folder), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    edit = ModelSettings(source=str(folder), name="ip2p")
    config = replace(config, models=(edit,), discord=replace(config.discord, edit_model="ip2p"))
    loaded = {"tiny-sd1": tiny_model, "ip2p": edit_model}
    pool = ModelPool([config.model, edit], max_loaded=2, load=lambda m: loaded[m.display_name])
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    worker = EngineWorker(pool, config.engine, config.generation, upscalers=config.upscalers)
    worker.start()
    try:
        yield emulator, config, queue, worker
    finally:
        worker.stop()
        engine.dispose()


@pytest.mark.asyncio
async def test_edit_with_words_queues_an_edit_of_the_image_on_the_edit_model(edit_setup):
    emu, config, queue, worker = edit_setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse", "seed": 4})
        await ix.wait_ack()
        first = await wait_result(emu)
        parent = job_of(first)
        assert f"sd:words:{parent}:0" in first.custom_ids and rows_of(first) <= 5
        press = await emu.click(emu.bob, first, f"sd:words:{parent}:0")
        assert await press.wait_ack() == 9  # the form
        submitted = await emu.submit_modal(emu.bob, press, {"What should change?": "make it night"})
        await submitted.wait_response(lambda m: "queued" in m.content)
        edited = await wait_result(emu, lambda m: job_of(m) != parent)
        shown = await help_embeds(emu)
        refused = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse", "model": "ip2p"})
        assert (
            "ip2p edits images: press 🪄 Edit with words"
            in (await refused.wait_response(lambda m: m.ephemeral)).content
        )
    help_text = "\n".join(e["description"] for e in shown)
    # /help names the edit model for what it is (the help of two models is clipped to Discord's
    # 6000 characters near its end: a limit of /help's length, not of this feature).
    assert "**ip2p**: InstructPix2Pix, for 🪄 **Edit with words**" in help_text
    job = queue.get(job_of(edited))
    assert (job.requester_id, job.kind, job.model, job.prompt) == (emu.bob.id, JobKind.img2img, "ip2p", "make it night")
    original = queue.images(parent)[0].png
    assert job.init_image == original and job.parent_id == parent
    params = read_parameters(edited.attachments[0].data)
    assert params["Prompt"] == "make it night" and params["Size"] == "64x64" and params["Model"] == "ip2p"
    assert Image.open(io.BytesIO(edited.attachments[0].data)).size == (64, 64)


def test_the_button_is_offered_only_with_an_edit_model():
    job = Job(id=7, width=64, height=64)
    assert "sd:words:7:0" in [item.custom_id for item in layout.result_view(job, 1, words=True).children]
    assert not any("words" in item.custom_id for item in layout.result_view(job, 1).children)
