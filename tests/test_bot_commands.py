"""The slash commands' answers to wrong values, uploads, and the small commands, end to end
against the Discord emulator. Most run without an engine (a bot whose GPU workers live
elsewhere), so jobs stay queued and the test sees exactly what the bot stored."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from PIL import Image

from bot_harness import bot_config, bot_running, new_queue, png
from discord_emulator import MANAGE_MESSAGES, Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue
    engine.dispose()


async def ephemeral_reply(ix) -> str:
    message = await ix.wait_response(lambda m: m.ephemeral)
    return message.content


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"steps": 999}, "`steps` must be a whole number from 1 to 8"),
        ({"steps": 0}, "`steps`"),
        ({"guidance": 99.5}, "`guidance` must be a number from 0 to 15"),
        ({"count": 5}, "`count`"),
        ({"seed": -1}, "`seed`"),
        ({"seed": 2**40}, "`seed`"),
        ({"size": "13x7"}, "`size` must be one of: 64x64, 64x128, 128x64"),
        ({"sampler": "plms"}, "`sampler` must be one of"),
        ({"prompt": "\u200b\u202e\u2066 \x00"}, "The prompt is empty"),
        ({"prompt": "x" * 1001}, "the limit is 1000"),
    ],
)
async def test_out_of_range_values_get_an_ephemeral_answer(setup, options, expected):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a cat", **options})
        assert expected in await ephemeral_reply(ix)
    assert queue.pending_for(emu.alice.id) == []
    assert not emu.channel_messages(emu.general)


async def test_imagine_queues_with_place_and_cancel(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(
            emu.alice,
            "imagine",
            {
                "prompt": "a\u202e cat\u200b  in\nspace",
                "steps": 3,
                "size": "128x64",
                "sampler": "ddim",
                "guidance": 2.5,
            },
        )
        assert await ix.wait_ack() == 5
        status = await ix.wait_response(lambda m: "queued" in m.content)
        (job,) = queue.pending_for(emu.alice.id)
        assert (job.prompt, job.steps, job.width, job.height, job.sampler, job.guidance) == (
            "a cat in space",
            3,
            128,
            64,
            "ddim",
            2.5,
        )
        assert f"Job #{job.id}" in status.content and "place **1**" in status.content
        assert f"sd:cancel:{job.id}" in status.custom_ids

        ix2 = await emu.slash(emu.bob, "imagine", {"prompt": "a dog"})
        status2 = await ix2.wait_response(lambda m: "queued" in m.content)
        assert "place **2**" in status2.content

        # /queue shows Alice's own jobs only.
        mine = await ephemeral_reply(await emu.slash(emu.alice, "queue"))
        assert f"Job #{job.id}" in mine and "a dog" not in mine

        # Bob may not cancel Alice's job; a moderator may; the status says so.
        denied = await emu.click(emu.bob, status, f"sd:cancel:{job.id}")
        assert "Only the member" in await ephemeral_reply(denied)
        ok = await emu.click(emu.mod, status, f"sd:cancel:{job.id}")
        assert "Cancelled" in await ephemeral_reply(ok)
        await emu.wait_for(lambda: "cancelled" in ix.original.content, what="status shows the cancel")
        assert queue.get(job.id).status.value == "cancelled"

        # /cancel without a job cancels Bob's latest; /info shows every parameter.
        assert "Cancelled" in await ephemeral_reply(await emu.slash(emu.bob, "cancel"))
        info = await ephemeral_reply(await emu.slash(emu.bob, "info", {"job": job.id}))
        assert "a cat in space" in info and "DDIM" in info and "cancelled" in info
        missing = await ephemeral_reply(await emu.slash(emu.bob, "info", {"job": 999999}))
        assert "There is no job #999999" in missing


async def test_cancel_by_a_moderator_counts_manage_messages_in_the_jobs_channel(setup):
    """/cancel job:N can be used anywhere: what counts is Manage Messages where the job is."""
    emu, config, queue = setup
    art = emu.add_channel("art")
    moderators = emu.guild.roles["moderator"]
    async with bot_running(emu, config, queue, None):
        await emu.set_permissions(emu.general, moderators, deny=MANAGE_MESSAGES)  # mods of #art only
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a cat"})
        await ix.wait_response(lambda m: "queued" in m.content)
        (job,) = queue.pending_for(emu.alice.id)
        refused = await emu.slash(emu.mod, "cancel", {"job": job.id}, channel=art)  # may manage #art, not #general
        assert "Only the member" in await ephemeral_reply(refused)
        assert queue.get(job.id).status.value == "queued"

        await emu.set_permissions(emu.general, moderators)  # the overwrite lifted
        await emu.set_permissions(art, moderators, deny=MANAGE_MESSAGES)
        ok = await emu.slash(emu.mod, "cancel", {"job": job.id}, channel=art)
        assert "Cancelled" in await ephemeral_reply(ok)
        assert queue.get(job.id).status.value == "cancelled"


async def test_pending_limit_is_an_ephemeral_refusal(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        for i in range(config.queue.pending_limit):
            ix = await emu.slash(emu.alice, "imagine", {"prompt": f"cat {i}"})
            await ix.wait_response(lambda m: "queued" in m.content)
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "one too many"})
        assert "limit 3" in await ephemeral_reply(ix)
    assert len(queue.pending_for(emu.alice.id)) == 3


async def test_checks_answer_while_the_shared_thread_pool_is_busy(setup):
    """The checks an interaction waits on run on the bot's own threads: background work filling
    asyncio's shared pool (slow writes, say) does not hold back an answer within the deadline."""
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        for i in range(config.queue.pending_limit):
            ix = await emu.slash(emu.alice, "imagine", {"prompt": f"cat {i}"})
            await ix.wait_response(lambda m: "queued" in m.content)
        release = threading.Event()
        loop = asyncio.get_running_loop()
        blockers = [loop.run_in_executor(None, release.wait) for _ in range(40)]  # more than it has threads
        try:
            ix = await emu.slash(emu.alice, "imagine", {"prompt": "one too many"})
            assert "limit 3" in await ephemeral_reply(ix)
            assert ix.response_type == 4  # answered directly, not deferred past the budget
        finally:
            release.set()
            await asyncio.gather(*blockers)


async def test_lora_tags_are_checked_before_the_job_is_queued(setup, tmp_path):
    from dataclasses import replace

    emu, config, queue = setup
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "add_detail.safetensors").write_bytes(b"")  # only its name matters to the bot
    config = replace(config, model=replace(config.model, lora_dir=str(loras)))
    async with bot_running(emu, config, queue, None):
        unknown = await emu.slash(emu.alice, "imagine", {"prompt": "a cat <lora:add_detial:0.8>"})
        assert "No LoRA named 'add_detial'; available: add_detail." in await ephemeral_reply(unknown)
        weight = await emu.slash(emu.alice, "imagine", {"prompt": "a cat <lora:add_detail:lots>"})
        assert "the weight must be a number such as 0.8" in await ephemeral_reply(weight)
        path = await emu.slash(emu.alice, "imagine", {"prompt": "a cat <lora:../../etc/passwd>"})
        assert "no folders" in await ephemeral_reply(path)
        assert queue.pending_for(emu.alice.id) == []
        ok = await emu.slash(emu.alice, "imagine", {"prompt": "a cat <lora:add_detail:0.8>"})
        await ok.wait_response(lambda m: "queued" in m.content)
    (job,) = queue.pending_for(emu.alice.id)
    assert job.prompt == "a cat <lora:add_detail:0.8>"


async def test_help_lists_every_command_with_its_limits(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        message = await (await emu.slash(emu.alice, "help")).wait_response()
    assert message.ephemeral
    text = "\n".join(e["description"] for e in message.embeds)
    for name in ("/imagine", "/img2img", "/queue", "/cancel", "/info"):
        assert name in text
    assert "1 to 8" in text and "64x64, 64x128, 128x64" in text and "Reroll" in text
    assert "Upscale (Subtle)" in text and "2x by Lanczos" in text  # no upscaler folder here
    synced = emu.command("imagine")
    steps = next(o for o in synced["options"] if o["name"] == "steps")
    assert (steps["min_value"], steps["max_value"]) == (1, 8)


def cmyk_jpeg() -> bytes:
    return png((80, 60), color=(0, 255, 255, 0), mode="CMYK", fmt="JPEG")


@pytest.mark.parametrize(
    "filename, data, content_type, size, expected",
    [
        ("notes.txt", b"hello", "text/plain", -1, "send a PNG, JPEG, WEBP image"),
        ("anim.gif", png(fmt="GIF"), "image/gif", -1, "send a PNG, JPEG, WEBP image"),
        ("big.png", png(), "image/png", 10 * 1024 * 1024, "the limit is 0.2 MiB"),
        ("broken.png", png()[:40], "image/png", -1, "could not be read as an image"),
        ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image/png", -1, "could not be read as an image"),
        ("bomb.png", png((8000, 8000), mode="1"), "image/png", -1, "megapixels"),
    ],
)
async def test_bad_uploads_are_refused(setup, filename, data, content_type, size, expected):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        attachment = emu.attachment(filename, data, content_type, size=size)
        ix = await emu.slash(emu.alice, "img2img", {"prompt": "a cat"}, attachments={"image": attachment})
        text = await ephemeral_reply(ix)
        assert expected in text
        if "limit" in expected or "send a" in expected:
            assert attachment.fetches == 0  # refused before downloading
    assert queue.pending_for(emu.alice.id) == []


@pytest.mark.parametrize(
    "data",
    [
        png((100, 50), color=(10, 20, 30, 0), mode="RGBA"),
        png((90, 90), mode="P", color=3),
        cmyk_jpeg(),
        png((70, 70), mode="I;16", color=40000),
        png((96, 64), fmt="WEBP"),
    ],
)
async def test_img2img_stores_a_normalised_image(setup, data):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        kind = "image/webp" if data[8:12] == b"WEBP" else ("image/jpeg" if data[:2] == b"\xff\xd8" else "image/png")
        attachment = emu.attachment("init", data, kind)
        ix = await emu.slash(
            emu.alice, "img2img", {"prompt": "a cat", "strength": 0.3}, attachments={"image": attachment}
        )
        await ix.wait_response(lambda m: "queued" in m.content)
    (job,) = queue.pending_for(emu.alice.id)
    image = Image.open(io.BytesIO(job.init_image))
    assert image.mode == "RGB" and image.size == (job.width, job.height)
    assert job.width % 8 == 0 and job.height % 8 == 0 and max(job.width, job.height) <= 128
    assert job.strength == 0.3 and job.kind.value == "img2img"


async def test_attachments_from_other_hosts_are_refused(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None, allowed_hosts=frozenset({"cdn.discordapp.com"})):
        attachment = emu.attachment("init.png", png(), "image/png")
        ix = await emu.slash(emu.alice, "img2img", {"prompt": "a cat"}, attachments={"image": attachment})
        assert "Discord's own servers" in await ephemeral_reply(ix)
        assert attachment.fetches == 0


async def test_results_from_another_process_and_failures_are_posted(setup):
    """A bot without a local engine posts what workers elsewhere stored, and failures with their reason."""
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        for prompt in ("made elsewhere", "doomed"):
            ix = await emu.slash(emu.alice, "imagine", {"prompt": prompt})
            await ix.wait_response(lambda m: "queued" in m.content)
        first, second = queue.claim("remote-gpu"), queue.claim("remote-gpu")
        assert queue.complete(first.id, "remote-gpu", [(png((64, 64)), first.seed)])
        assert queue.fail(second.id, "remote-gpu", "the image came out black; try another seed")
        done = await emu.wait_for_message(emu.general, lambda m: bool(m.attachments) and m.pinged, timeout=10)
        failed = await emu.wait_for_message(emu.general, lambda m: "failed" in m.content and m.pinged, timeout=10)
        await emu.wait_for(lambda: not queue.undelivered(), what="both recorded as posted")
    assert done.pinged_users == {emu.alice.id} and f"sd:reroll:{first.id}" in done.custom_ids
    assert "came out black" in failed.content and failed.pinged_users == {emu.alice.id}


async def test_jobs_for_a_model_removed_from_the_config_fail_at_start_with_a_reason(setup):
    """A job queued for a model that has since left config.toml would wait for ever: the bot
    fails it when it starts, and its member is told why and what to pick instead."""
    emu, config, queue = setup
    job = queue.enqueue(
        requester_id=emu.alice.id,
        guild_id=emu.guild.id,
        channel_id=emu.general.id,
        prompt="a cat",
        model="retired-model",
    )
    async with bot_running(emu, config, queue, None):
        failed = await emu.wait_for_message(emu.general, lambda m: "failed" in m.content and m.pinged, timeout=10)
        await emu.wait_for(lambda: not queue.undelivered(), what="the failure recorded as posted")
    assert queue.get(job.id).status.value == "failed"
    assert "retired-model" in failed.content and "tiny-sd1" in failed.content
    assert failed.pinged_users == {emu.alice.id}


async def test_model_option_offers_configured_models_and_is_stored(setup):
    from dataclasses import replace

    from engine.config.settings import ModelSettings

    emu, config, queue = setup
    config = replace(config, models=(ModelSettings(source="elsewhere", name="anime"),))
    async with bot_running(emu, config, queue, None):
        for command in ("imagine", "img2img"):
            option = next(o for o in emu.command(command)["options"] if o["name"] == "model")
            assert option.get("autocomplete") is True
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a fox", "model": "nope"})
        refused = await ephemeral_reply(ix)
        assert "`model` must be one of: tiny-sd1, anime" in refused
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a fox", "model": "anime"})
        await ix.wait_response(lambda m: "queued" in m.content)
        ix = await emu.slash(
            emu.alice,
            "img2img",
            {"prompt": "a fox", "model": "anime", "image": "A"},
            attachments={"image": emu.attachment("in.png", png((64, 64)))},
        )
        await ix.wait_response(lambda m: "queued" in m.content)
    assert [job.model for job in queue.pending_for(emu.alice.id)] == ["anime", "anime"]
