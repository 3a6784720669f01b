"""The "Image info" and "Use these settings" message context menus, end to end."""

from __future__ import annotations

import io

import pytest
from PIL import Image, PngImagePlugin

from bot_harness import bot_config, bot_running, new_queue
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

A1111_TEXT = (
    "a castle on a hill, (golden hour:1.2)\nNegative prompt: blurry, lowres\n"
    "Steps: 99, Sampler: Restart, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, "
    "Size: 64x128, Model hash: abcdef1234, Model: someoneElses, Version: v1.10.1"
)


def png_with(text: str | None, **more: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    for key, value in more.items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(out, "PNG", pnginfo=info)
    return out.getvalue()


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue
    engine.dispose()


async def test_image_info_reads_another_tools_png(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        posted = emu.post(emu.alice, "look", attachments=(emu.attachment("castle.png", png_with(A1111_TEXT)),))
        ix = await emu.message_command(emu.bob, "Image info", posted)
        reply = await ix.wait_response(lambda m: m.ephemeral)
    assert "a castle on a hill" in reply.content and "blurry, lowres" in reply.content
    assert "**Steps:** 99" in reply.content and "**Seed:** 1234" in reply.content
    assert "**Sampler:** Restart" in reply.content


@pytest.mark.parametrize(
    "attachment, expected",
    [
        (("notes.txt", b"hello", "text/plain"), "no PNG attached"),
        (("plain.png", None, "image/png"), "no generation parameters"),
        (("broken.png", b"\x89PNG\r\n\x1a\nxx", "image/png"), "could not be read"),
    ],
)
async def test_image_info_refuses_what_it_cannot_read(setup, attachment, expected):
    emu, config, queue = setup
    name, data, kind = attachment
    async with bot_running(emu, config, queue, None):
        file = emu.attachment(name, png_with(None) if data is None else data, kind)
        posted = emu.post(emu.alice, attachments=(file,))
        ix = await emu.message_command(emu.bob, "Image info", posted)
        reply = await ix.wait_response(lambda m: m.ephemeral)
    assert expected in reply.content


async def test_use_these_settings_queues_them_within_the_servers_limits(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        posted = emu.post(emu.alice, attachments=(emu.attachment("castle.png", png_with(A1111_TEXT)),))
        ix = await emu.message_command(emu.bob, "Use these settings", posted)
        status = await ix.wait_response(lambda m: "queued" in m.content)
    (job,) = queue.pending_for(emu.bob.id)
    assert (job.prompt, job.negative_prompt, job.seed, job.guidance) == (
        "a castle on a hill, (golden hour:1.2)",
        "blurry, lowres",
        1234,
        6.5,
    )
    assert (job.steps, job.sampler, job.width, job.height) == (8, config.generation.default_sampler, 64, 128)
    assert "steps 99 → 8" in status.content and "Restart is not offered" in status.content
    assert "someoneElses is not configured" in status.content


async def test_image_info_on_our_own_result_names_its_job(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a fox"})
        await ix.wait_response(lambda m: "queued" in m.content)
        job = queue.claim("remote-gpu")
        made = png_with(
            f"a fox\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: {job.seed}, Size: 64x64, Job id: {job.id}",
            job_id=str(job.id),
        )
        assert queue.complete(job.id, "remote-gpu", [(made, job.seed)])
        result = await emu.wait_for_message(emu.general, lambda m: bool(m.attachments), timeout=60)
        ix = await emu.message_command(emu.bob, "Image info", result)
        reply = await ix.wait_response(lambda m: m.ephemeral)
    assert f"job #{job.id}" in reply.content and "a fox" in reply.content
