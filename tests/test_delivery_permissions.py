"""Results reach their member when the bot may not post in the channel: by direct message,
saying which permission is missing; the server's owner is told once per channel and permission;
with DMs closed as well, the result stays stored and the job is not retried for ever.

End to end with the real client against the emulator, which refuses posts as Discord does. A
bot without an engine: a "remote worker" completes each job, so the test controls when.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from bot_harness import bot_config, bot_running, new_queue, png
from db.models import PostedMessage
from discord_emulator import ATTACH_FILES, EMBED_LINKS, SEND_MESSAGES, VIEW_CHANNEL, Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue
    engine.dispose()


async def finished_job(emu: Emulator, queue, user, prompt: str = "a cat"):
    """``user`` runs /imagine; a remote worker makes the image. The interaction and the job."""
    ix = await emu.slash(user, "imagine", {"prompt": prompt})
    await ix.wait_response(lambda m: "queued" in m.content, timeout=60)
    job = queue.claim("remote-gpu")
    queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
    return ix, job


def posted_rows(queue, job_id: int) -> list[tuple[int, int]]:
    with Session(queue.engine) as session:
        rows = session.scalars(select(PostedMessage).where(PostedMessage.job_id == job_id)).all()
    return [(r.channel_id, r.message_id) for r in rows]


async def test_without_attach_files_the_result_goes_by_dm_and_the_owner_is_told_once(setup):
    emu, config, queue = setup
    await emu.set_permissions(emu.general, emu.bot_user, deny=ATTACH_FILES)
    async with bot_running(emu, config, queue, None):
        ix, job = await finished_job(emu, queue, emu.alice)
        dm = await emu.wait_for_dm(emu.alice, lambda m: bool(m.attachments), timeout=120)
        await emu.wait_for(lambda: queue.get(job.id).posted_at is not None, timeout=120, what="marked posted")
        assert "could not post in #general" in dm.content and "missing permission: Attach Files" in dm.content
        assert "here is your result" in dm.content and dm.nonce == f"sdjob{job.id}"
        assert f"sd:reroll:{job.id}" in dm.custom_ids and dm.embeds
        # Kept reachable: recorded where it went, so buttons, 🔁 and /show find it.
        assert posted_rows(queue, job.id) == [(dm.channel.id, dm.id)]
        assert queue.job_for_message(dm.id).id == job.id
        assert "direct message" in ix.original.content and "Attach Files" in ix.original.content
        refused = [c for c in emu.calls if c.method == "POST" and c.path == f"/channels/{emu.general.id}/messages"]
        assert [c.status for c in refused] == [403]

        (told,) = await emu.wait_for(lambda: emu.dm_messages(emu.owner), timeout=120, what="the owner told")
        assert "#general" in told.content and "Attach Files" in told.content and emu.guild.name in told.content

        # A second result in the same channel: by DM again, the owner is not told twice.
        _, second = await finished_job(emu, queue, emu.bob, "a dog")
        await emu.wait_for_dm(emu.bob, lambda m: bool(m.attachments), timeout=120)
        await emu.wait_for(lambda: queue.get(second.id).posted_at is not None, timeout=120, what="marked posted")
    assert len(emu.dm_messages(emu.owner)) == 1
    assert len(emu.dm_messages(emu.alice)) == 1 and not [m for m in emu.channel_messages(emu.general) if m.attachments]


async def test_the_owner_is_told_once_across_restarts_and_again_once_the_permission_came_back_and_went(setup):
    emu, config, queue = setup

    async def refused_once(member, prompt: str) -> None:
        _, job = await finished_job(emu, queue, member, prompt)
        await emu.wait_for(lambda: queue.get(job.id).posted_at is not None, timeout=120, what="marked posted")

    await emu.set_permissions(emu.general, emu.bot_user, deny=ATTACH_FILES)
    async with bot_running(emu, config, queue, None):
        await refused_once(emu.alice, "a cat")
        await emu.wait_for(lambda: emu.dm_messages(emu.owner), timeout=120, what="the owner told")
    async with bot_running(emu, config, queue, None):  # a restart: still missing, not told again
        await refused_once(emu.bob, "a dog")
        assert len(emu.dm_messages(emu.owner)) == 1
        await emu.set_permissions(emu.general, emu.bot_user)  # given back: a result is posted there
        await refused_once(emu.alice, "a bird")
        (bird,) = [m for m in emu.channel_messages(emu.general) if m.attachments]
        await emu.set_permissions(emu.general, emu.bot_user, deny=ATTACH_FILES)  # and taken again
        await refused_once(emu.bob, "a fish")
        await emu.wait_for(lambda: len(emu.dm_messages(emu.owner)) >= 2, timeout=120, what="the owner told again")
    first, again = emu.dm_messages(emu.owner)
    assert first.id < bird.id < again.id  # not after the restart: only once the permission came back and went


@pytest.mark.parametrize("denied, name", [(SEND_MESSAGES, "Send Messages"), (VIEW_CHANNEL, "View Channel")])
async def test_a_permission_taken_away_while_running_is_named(setup, denied, name):
    """Only the permission that matters: without it Discord (and discord.py) deny the rest too."""
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        await emu.set_permissions(emu.general, emu.bot_user, deny=denied)  # CHANNEL_UPDATE
        _, job = await finished_job(emu, queue, emu.alice)
        dm = await emu.wait_for_dm(emu.alice, lambda m: bool(m.attachments), timeout=120)
        assert f"(missing permission: {name})" in dm.content
        told = await emu.wait_for(lambda: emu.dm_messages(emu.owner), timeout=120, what="the owner told")
        assert name in told[0].content


async def test_without_embed_links_the_result_is_posted_and_the_owner_told(setup):
    emu, config, queue = setup
    await emu.set_permissions(emu.general, emu.bot_user, deny=EMBED_LINKS)
    async with bot_running(emu, config, queue, None):
        _, job = await finished_job(emu, queue, emu.alice)
        posted = await emu.wait_for_message(emu.general, lambda m: bool(m.attachments), timeout=120)
        assert posted.embeds == []  # Discord drops them silently
        (told,) = await emu.wait_for(lambda: emu.dm_messages(emu.owner), timeout=120, what="the owner told")
        assert "Embed Links" in told.content and "#general" in told.content
    assert emu.dm_messages(emu.alice) == []


async def test_with_dms_closed_too_the_result_stays_stored_and_is_not_retried(setup, caplog):
    emu, config, queue = setup
    emu.revoke_permissions(emu.general)  # the bot's cache does not know which permission
    emu.block_dms(emu.alice)
    emu.block_dms(emu.owner)
    caplog.set_level(logging.WARNING, logger="bot.delivery")
    async with bot_running(emu, config, queue, None):
        ix, job = await finished_job(emu, queue, emu.alice)
        await emu.wait_for(lambda: queue.get(job.id).posted_at is not None, timeout=120, what="handled")
        await emu.wait_for(lambda: "/show" in ix.original.content, timeout=120, what="the status says /show")
        assert "a permission Discord did not name" in ix.original.content
        assert queue.undelivered() == [] and posted_rows(queue, job.id) == []
        assert len(queue.images(job.id)) == 1  # still stored

        # A second job in the same channel: a sync point after which the first was long handled.
        _, second = await finished_job(emu, queue, emu.alice, "a dog")
        await emu.wait_for(lambda: queue.get(second.id).posted_at is not None, timeout=120, what="handled")
    posts = [c for c in emu.calls if c.method == "POST" and c.path.endswith("/messages")]
    # The channel and the member's DMs once per job, the owner's DMs once.
    assert len(posts) == 5 and all(c.status == 403 for c in posts)
    stored = [r for r in caplog.records if "stays stored" in r.getMessage()]
    assert [r.getMessage().split(":")[0] for r in stored] == [f"job {job.id}", f"job {second.id}"]
    owner = [r for r in caplog.records if "could not tell the owner" in r.getMessage()]
    assert len(owner) == 1 and owner[0].levelno == logging.WARNING  # once per channel and permission


async def test_private_results_with_dms_closed_and_no_channel_permission_stay_stored(setup):
    emu, config, queue = setup
    emu.block_dms(emu.alice)
    async with bot_running(emu, config, queue, None):
        settings = await emu.slash(emu.alice, "settings set", {"private": True})
        await settings.wait_response(lambda m: m.ephemeral, timeout=60)
        await emu.set_permissions(emu.general, emu.bot_user, deny=SEND_MESSAGES)
        ix, job = await finished_job(emu, queue, emu.alice)
        await emu.wait_for(lambda: queue.get(job.id).posted_at is not None, timeout=120, what="handled")
        await emu.wait_for(lambda: "/show" in ix.original.content, timeout=120, what="the status says /show")
        assert "Send Messages" in ix.original.content and "direct messages" in ix.original.content
        await emu.wait_for(lambda: emu.dm_messages(emu.owner), timeout=120, what="the owner told")
