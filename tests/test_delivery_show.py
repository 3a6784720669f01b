"""``Delivery.show_again`` (what ``/show job`` calls) posts a finished job's result again, with
its buttons, as the answer to the interaction, or in the channel when the interaction cannot
carry it; a job not finished gets a clear refusal.

Driven through a small test command registered on the real bot, against the emulator.
"""

from __future__ import annotations

import asyncio

import discord
import pytest
from discord import app_commands

from bot_harness import bot_config, make_bot, new_queue, png
from discord_emulator import Emulator, running
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue
    engine.dispose()


def bot_with_show_command(config, queue):
    """The real bot (no engine), plus /showtest job:N [private], which calls show_again."""
    bot = make_bot(config, queue, None)

    @app_commands.command(name="showtest", description="Post a job's result again")
    async def showtest(interaction: discord.Interaction, job: int, private: bool = False) -> None:
        found = await asyncio.to_thread(queue.get, job)
        await bot.delivery.show_again(interaction, found, ephemeral=private)

    bot.tree.add_command(showtest)  # before start: setup_hook syncs it with the others
    return bot


async def made_by_a_remote_worker(emu: Emulator, queue, user, prompt: str, *, error: str | None = None):
    ix = await emu.slash(user, "imagine", {"prompt": prompt})
    await ix.wait_response(lambda m: "queued" in m.content, timeout=60)
    job = queue.claim("remote-gpu")
    if error is None:
        queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
    else:
        queue.fail(job.id, "remote-gpu", error)
    await emu.wait_for(lambda: queue.get(job.id).posted_at is not None, timeout=120, what="delivered")
    return job


def is_result_of(job_id: int):
    return lambda m: f"sd:reroll:{job_id}" in m.custom_ids


async def test_show_again_brings_back_a_deleted_result_with_working_buttons(setup):
    emu, config, queue = setup
    async with running(bot_with_show_command(config, queue), emu):
        job = await made_by_a_remote_worker(emu, queue, emu.alice, "a lighthouse")
        first = await emu.wait_for_message(emu.general, is_result_of(job.id), timeout=60)
        await emu.delete_message(first)

        ix = await emu.slash(emu.bob, "showtest", {"job": job.id})
        again = await ix.wait_response(lambda m: bool(m.attachments), timeout=120)
        assert not again.ephemeral and again.channel is emu.general
        assert again.embeds and again.embeds[0]["footer"]["text"] == f"Job #{job.id}"
        assert [a.filename for a in again.attachments] == [a.filename for a in first.attachments]
        assert again.custom_ids == first.custom_ids and not again.pinged
        # Recorded like the first post: a 🔁 on it queues a reroll for whoever reacted.
        await emu.wait_for(lambda: queue.job_for_message(again.id), timeout=120, what="recorded")
        assert queue.job_for_message(again.id).id == job.id
        await emu.react(emu.bob, again, "🔁")
        await emu.wait_for(lambda: queue.pending_for(emu.bob.id), timeout=120, what="bob's reroll")

        private = await emu.slash(emu.bob, "showtest", {"job": job.id, "private": True})
        mine = await private.wait_response(lambda m: bool(m.attachments), timeout=120)
        assert mine.ephemeral and is_result_of(job.id)(mine)


async def test_a_failed_job_shows_its_notice_and_an_unfinished_one_is_refused(setup):
    emu, config, queue = setup
    async with running(bot_with_show_command(config, queue), emu):
        failed = await made_by_a_remote_worker(emu, queue, emu.alice, "a storm", error="out of memory")
        ix = await emu.slash(emu.alice, "showtest", {"job": failed.id})
        notice = await ix.wait_response(lambda m: "failed" in m.content, timeout=120)
        assert "out of memory" in notice.content and f"sd:reroll:{failed.id}" in notice.custom_ids

        waiting = await emu.slash(emu.alice, "imagine", {"prompt": "still waiting"})
        await waiting.wait_response(lambda m: "queued" in m.content, timeout=60)
        (pending,) = queue.pending_for(emu.alice.id)
        refused = await emu.slash(emu.alice, "showtest", {"job": pending.id})
        answer = await refused.wait_response(lambda m: m.ephemeral, timeout=120)
        assert f"Job #{pending.id} has not finished yet" in answer.content and "place 1 in line" in answer.content
        assert [m for m in refused.messages if not m.ephemeral] == []


async def test_when_the_interaction_cannot_carry_it_the_result_goes_in_the_channel(setup):
    emu, config, queue = setup
    async with running(bot_with_show_command(config, queue), emu):
        job = await made_by_a_remote_worker(emu, queue, emu.alice, "a late night")
        before = len(emu.channel_messages(emu.general))
        emu.token_lifetime = 0.0  # the acknowledgement works, every followup is refused (401 50027)
        private = await emu.slash(emu.alice, "showtest", {"job": job.id, "private": True})
        await emu.wait_for(
            lambda: any(c.status == 401 and private.token in c.path for c in emu.calls),
            timeout=120,
            what="the private answer refused",
        )
        await emu.slash(emu.alice, "showtest", {"job": job.id})
        posted = await emu.wait_for(
            lambda: [
                m
                for m in emu.channel_messages(emu.general)[before:]
                if m.interaction is None and is_result_of(job.id)(m) and m.attachments
            ],
            timeout=120,
            what="the result in the channel",
        )
        assert any(c.status == 401 and c.path.startswith("/webhooks/") for c in emu.calls)
        await emu.wait_for(lambda: queue.job_for_message(posted[0].id), timeout=120, what="recorded")
        assert len(posted) == 1  # the private one was not posted in the channel instead
