"""/settings, /server and /stats end to end against the Discord emulator, and the server policy
that every new job passes. A bot without an engine: jobs stay queued, so the test sees what was
stored (and a "remote worker" completes one where a result message is needed)."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from bot_harness import (
    bot_running,
    help_embeds,
    png,
    queued_setup,  # noqa: F401 - the fixture
)
from db.models import PostedMessage
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


@pytest.fixture
def setup(queued_setup):
    return queued_setup


async def ephemeral(emu: Emulator, user, name: str, options=None, **kwargs) -> str:
    ix = await emu.slash(user, name, options, **kwargs)
    return (await ix.wait_response(lambda m: m.ephemeral)).content


async def queued(emu: Emulator, user, prompt: str = "a cat", **kwargs):
    ix = await emu.slash(user, "imagine", {"prompt": prompt, **kwargs.pop("options", {})}, **kwargs)
    return await ix.wait_response(lambda m: "queued" in m.content or m.ephemeral)


async def test_member_defaults_fill_left_out_options(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        saved = await ephemeral(
            emu,
            emu.alice,
            "settings set",
            {"steps": 5, "size": "128x64", "sampler": "ddim", "guidance": 3.5, "negative": "blurry"},
        )
        assert "Saved" in saved and "**5**" in saved and "128x64" in saved
        await queued(emu, emu.alice)
        await queued(emu, emu.alice, options={"steps": 7, "size": "64x64", "negative": "ugly"})
        await queued(emu, emu.bob)  # Bob has no defaults: the bot's
        first, explicit = queue.pending_for(emu.alice.id)
        (bobs,) = queue.pending_for(emu.bob.id)
        assert (first.steps, first.width, first.height, first.sampler, first.guidance, first.negative_prompt) == (
            5,
            128,
            64,
            "ddim",
            3.5,
            "blurry",
        )
        assert (explicit.steps, explicit.width, explicit.negative_prompt) == (7, 64, "ugly")  # options win
        g = config.generation
        assert (bobs.steps, bobs.width, bobs.sampler) == (g.default_steps, g.default_width, g.default_sampler)

        assert "**ddim**" in (await ephemeral(emu, emu.alice, "settings show")).lower()
        await ephemeral(emu, emu.alice, "settings reset", {"setting": "steps"})
        assert community.member_defaults(emu.alice.id).steps is None
        assert community.member_defaults(emu.alice.id).sampler == "ddim"
        await ephemeral(emu, emu.alice, "settings reset")
        assert community.member_defaults(emu.alice.id).sampler is None


@pytest.mark.parametrize(
    "command, options",
    [
        ("server pause", None),
        ("server show", None),
        ("server log", None),
        ("stats", None),
        ("server limits", {"cooldown": 5}),
    ],
)
async def test_server_and_stats_are_for_managers_only(setup, command, options):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        for user in (emu.alice, emu.mod):  # Manage Messages is not Manage Server
            assert "Manage Server" in await ephemeral(emu, user, command, options)
        synced = emu.command(command.split()[0])
        assert int(synced["default_member_permissions"]) == 1 << 5  # hidden from members by default too
    assert community.server_policy(emu.guild.id).paused is False
    assert community.audit_log(emu.guild.id) == []


async def test_channels_pause_bar_and_limits(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        # Only in the channels the managers chose; the refusal names them.
        shown = await ephemeral(emu, emu.admin, "server channels", {"action": "add", "channel": emu.nsfw_channel})
        assert f"<#{emu.nsfw_channel.id}>" in shown
        refused = await queued(emu, emu.alice)
        assert refused.ephemeral and f"<#{emu.nsfw_channel.id}>" in refused.content
        assert "queued" in (await queued(emu, emu.alice, channel=emu.nsfw_channel)).content
        await ephemeral(emu, emu.admin, "server channels", {"action": "clear"})

        # Paused: new jobs refused, and the claim skips the server's waiting jobs.
        assert "paused" in await ephemeral(emu, emu.admin, "server pause")
        refused = await queued(emu, emu.bob)
        assert refused.ephemeral and "paused" in refused.content
        assert queue.claim("remote-gpu") is None
        await ephemeral(emu, emu.admin, "server resume")
        assert "queued" in (await queued(emu, emu.bob)).content

        # Barred: refused until unbarred.
        assert "now barred" in await ephemeral(emu, emu.admin, "server bar", {"member": emu.bob})
        refused = await queued(emu, emu.bob, "another")
        assert refused.ephemeral and "barred" in refused.content
        await ephemeral(emu, emu.admin, "server unbar", {"member": emu.bob})

        # Limits narrower than the configuration's.
        await ephemeral(emu, emu.admin, "server limits", {"max_steps": 4, "max_size": "64x128", "max_count": 2})
        for options, expected in (
            ({"steps": 6}, "at most 4 steps"),
            ({"count": 3}, "at most 2 images"),
            ({"size": "128x64"}, "up to 64x128"),
        ):
            refused = await queued(emu, emu.bob, options=options)
            assert refused.ephemeral and expected in refused.content

        # Purge cancels a member's jobs on this server.
        purged = await ephemeral(emu, emu.admin, "server purge", {"member": emu.bob})
        assert "Cancelled 1 job(s)" in purged
        assert queue.pending_for(emu.bob.id) == []

        log = await ephemeral(emu, emu.admin, "server log")
    assert f"<@{emu.admin.id}>" in log and "**purge**" in log and "**paused**" in log
    entries = community.audit_log(emu.guild.id, limit=50)
    assert {e.actor_id for e in entries} == {emu.admin.id}
    assert [e.action for e in reversed(entries)][:4] == [
        "allowed_channel_ids",
        "allowed_channel_ids",
        "paused",
        "paused",
    ]
    assert ("max_steps", None, "4") in {(e.action, e.old_value, e.new_value) for e in entries}


async def test_cooldown_and_daily_limit_say_when_to_try_again(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        await ephemeral(emu, emu.admin, "server limits", {"cooldown": 600})
        assert "queued" in (await queued(emu, emu.alice)).content
        refused = await queued(emu, emu.alice, "again")
        assert refused.ephemeral and "600-second cooldown" in refused.content and "Try again in" in refused.content
        assert "<t:" in refused.content
        await ephemeral(emu, emu.admin, "server limits", {"cooldown": 0, "daily_limit": 2})
        assert "queued" in (await queued(emu, emu.alice, "second")).content
        refused = await queued(emu, emu.alice, "third")
        assert refused.ephemeral and "limit of 2 jobs in 24 hours" in refused.content
        assert "You can make another <t:" in refused.content
    assert len(queue.pending_for(emu.alice.id)) == 2


async def test_nsfw_words_only_in_age_restricted_channels(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        await ephemeral(emu, emu.admin, "server nsfw", {"action": "add", "words": "Gore, blood bath"})
        for prompt in ("a gore scene", "(GORE:1.3) forest", "a blood bath"):
            refused = await queued(emu, emu.alice, prompt)
            assert refused.ephemeral and "age-restricted" in refused.content
        assert "queued" in (await queued(emu, emu.alice, "a goretex jacket")).content  # whole words only
        assert "queued" in (await queued(emu, emu.bob, "a gore scene", channel=emu.nsfw_channel)).content
    assert community.server_policy(emu.guild.id).nsfw_words == ("gore", "blood bath")


async def test_buttons_pass_the_same_policy(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        await queued(emu, emu.alice)
        job = queue.claim("remote-gpu")
        queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
        posted = await emu.wait_for_message(emu.general, lambda m: bool(m.attachments), timeout=10)
        await ephemeral(emu, emu.admin, "server bar", {"member": emu.bob})
        denied = await emu.click(emu.bob, posted, f"sd:reroll:{job.id}")
        assert "barred" in (await denied.wait_response(lambda m: m.ephemeral)).content
        assert queue.pending_for(emu.bob.id) == []
        ok = await emu.click(emu.alice, posted, f"sd:reroll:{job.id}")
        await ok.wait_response(lambda m: "queued" in m.content)
    assert len(queue.pending_for(emu.alice.id)) == 1


async def test_stats_show_counts_and_help_lists_the_new_commands(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        for user, prompt in ((emu.alice, "one"), (emu.alice, "two"), (emu.bob, "three")):
            await queued(emu, user, prompt)
        job = queue.claim("remote-gpu")
        queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
        text = await ephemeral(emu, emu.admin, "stats")
        help_shown = await help_embeds(emu)
        help_text = "\n".join(e["description"] for e in help_shown)
    assert "**Jobs today:** 3" in text and "**this week:** 3" in text
    # Members show as mentions (the bot does not cache members); ephemeral, so nobody is pinged.
    assert f"1. <@{emu.alice.id}>: 2" in text and f"2. <@{emu.bob.id}>: 1" in text
    assert "2 waiting and 0 running here" in text and "Average wait" in text
    for name in ("/settings set", "/settings show", "/server limits", "/server pause", "/server bar", "/stats"):
        assert name in help_text
    assert all(len(e["description"]) <= 4096 for e in help_shown) and "Reroll" in help_text


async def test_reaction_rerolls_follow_the_server_rules(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        # A result made "elsewhere" (a worker process) and posted by this bot.
        job = queue.enqueue(
            requester_id=emu.alice.id,
            guild_id=emu.guild.id,
            channel_id=emu.general.id,
            prompt="a cat",
            width=64,
            height=64,
            steps=2,
        )
        queue.claim("remote-gpu")
        queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
        result = await emu.wait_for_message(emu.general, lambda m: m.attachments, timeout=60)

        await ephemeral(emu, emu.admin, "server bar", {"member": emu.bob})
        await emu.react(emu.bob, result, "🔁")
        await emu.react(emu.alice, result, "🔁")  # alice may; her reroll is queued
        await emu.wait_for(lambda: len(queue.pending_for(emu.alice.id)) == 1, timeout=60, what="alice's reroll")
        assert queue.pending_for(emu.bob.id) == []
        assert not any(
            "rerolling" in m.content and str(emu.bob.id) in m.content for m in emu.channel_messages(emu.general)
        )


async def test_private_results_go_by_direct_message(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        assert "Saved" in await ephemeral(emu, emu.alice, "settings set", {"private": True})
        status = await queued(emu, emu.alice)
        job = queue.claim("remote-gpu")
        queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
        dm = await emu.wait_for_dm(emu.alice, lambda m: bool(m.attachments), timeout=10)
        await emu.wait_for(lambda: queue.get(job.id).posted_at is not None, timeout=10, what="marked posted")
        assert dm.channel.is_dm and dm.channel.recipient is emu.alice
        assert dm.nonce == f"sdjob{job.id}" and dm.attachments[0].filename.endswith(".png")
        assert f"sd:reroll:{job.id}" in dm.custom_ids and dm.embeds and dm.embeds[0]["fields"]
        # Nothing with the image in the channel; the status message says where it went.
        assert not [m for m in emu.channel_messages(emu.general) if m.attachments or m.embeds]
        assert "done" in status.content and "direct message" in status.content and not status.attachments
        assert not status.components
        # Bob's results (no private setting) still go to the channel.
        await queued(emu, emu.bob)
        bobs = queue.claim("remote-gpu")
        queue.complete(bobs.id, "remote-gpu", [(png((64, 64)), bobs.seed)])
        await emu.wait_for_message(emu.general, lambda m: bool(m.attachments), timeout=10)
        assert emu.dm_messages(emu.bob) == []
    with Session(queue.engine) as session:  # where mark_posted recorded it
        rows = session.scalars(select(PostedMessage).where(PostedMessage.job_id == job.id)).all()
    assert [(r.channel_id, r.message_id) for r in rows] == [(dm.channel.id, dm.id)]
    assert len(emu.dm_messages(emu.alice)) == 1  # exactly once


async def test_private_results_fall_back_to_the_channel_when_dms_are_closed(setup):
    emu, config, queue, community = setup
    emu.block_dms(emu.alice)
    async with bot_running(emu, config, queue, None):
        await ephemeral(emu, emu.alice, "settings set", {"private": True})
        status = await queued(emu, emu.alice)
        job = queue.claim("remote-gpu")
        queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
        posted = await emu.wait_for_message(emu.general, lambda m: bool(m.attachments), timeout=10)
        await emu.wait_for(lambda: queue.get(job.id).posted_at is not None, timeout=10, what="marked posted")
        assert f"<@{emu.alice.id}>" in posted.content and "DM" in posted.content
        assert emu.alice.id in posted.pinged_users and posted.nonce == f"sdjob{job.id}"
        assert f"sd:reroll:{job.id}" in posted.custom_ids
        assert emu.dm_messages(emu.alice) == []
        assert any(
            c.status == 403 and c.path == f"/channels/{emu.dm_channel(emu.alice).id}/messages" for c in emu.calls
        )
        assert str(posted.id) in status.content and "direct messages" in status.content
    assert len([m for m in emu.channel_messages(emu.general) if m.attachments]) == 1


async def test_nsfw_results_are_spoilered_outside_age_restricted_channels(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        await ephemeral(emu, emu.admin, "server nsfw", {"action": "add", "words": "gore"})
        # Made in the age-restricted channel and posted there: shown as is.
        await queued(emu, emu.bob, "a gore scene", channel=emu.nsfw_channel)
        job = queue.claim("remote-gpu")
        queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
        there = await emu.wait_for_message(emu.nsfw_channel, lambda m: bool(m.attachments), timeout=10)
        assert not there.attachments[0].filename.startswith("SPOILER_")
        # The same prompt for a member whose results go by DM: spoilered, and not in the embed.
        assert "Saved" in await ephemeral(emu, emu.alice, "settings set", {"private": True})
        await queued(emu, emu.alice, "a gore scene", channel=emu.nsfw_channel)
        job = queue.claim("remote-gpu")
        queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
        dm = await emu.wait_for_dm(emu.alice, lambda m: bool(m.attachments), timeout=10)
        assert dm.attachments[0].filename.startswith("SPOILER_")
        assert not dm.embeds[0].get("image")
