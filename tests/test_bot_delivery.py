"""Delivery end to end: progress edits, exactly-once posting through Discord faults (429, lost
answers, a deleted channel, missing permissions: see also test_delivery_permissions.py), and the
expired interaction token."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from bot_harness import bot_running, results, setup  # noqa: F401 - setup is a fixture
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.serving.worker import EngineWorker

pytestmark = pytest.mark.asyncio


async def test_progress_is_shown_on_the_status_message(setup, tiny_model):
    emu, config, queue, _ = setup
    # Long enough (40 steps x 4 images) that progress edits, 0.2 s apart, happen on any machine.
    config = replace(config, generation=replace(config.generation, max_steps=40))
    worker = EngineWorker(tiny_model, config.engine, config.generation)
    worker.start()
    try:
        async with bot_running(emu, config, queue, worker):
            ix = await emu.slash(emu.alice, "imagine", {"prompt": "a slow cat", "steps": 40, "count": 4})
            await ix.wait_ack()
            await emu.wait_for(lambda: results(emu), timeout=120, what="the result")
            await emu.wait_for(lambda: "done" in ix.original.content, what="status done")
    finally:
        worker.stop()
    versions = [*ix.original.edits, ix.original.payload()]
    texts = [v["content"] for v in versions]
    assert any("queued" in t for t in texts)
    assert any("step" in t for t in texts)
    assert any(a["filename"] == "preview.png" for v in versions for a in v["attachments"])
    assert ix.original.attachments == [] and ix.original.components == []  # no Cancel once done


async def test_rate_limit_and_lost_answer_still_post_once(setup):
    emu, config, queue, worker = setup
    emu.fail_next("POST", "/channels/*/messages", 429, count=2)
    emu.fail_next("POST", "/channels/*/messages", 500, after=True)  # created, but the answer is lost
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a flaky network"})
        await ix.wait_ack()
        # Recorded as posted only after the status says so (a crash in between repeats both).
        await emu.wait_for(
            lambda: "done" in ix.original.content and queue.get(1).posted_at,
            timeout=60,
            what="status done and the post recorded",
        )
    assert len(results(emu)) == 1
    (job,) = [queue.get(j.id) for j in [queue.job_for_message(results(emu)[0].id)]]
    assert job.posted_at is not None
    assert queue.undelivered() == []


async def test_deleted_channel_stops_the_attempts(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "into the void"})
        await ix.wait_ack()
        await emu.delete_channel(emu.general)
        await emu.wait_for(
            lambda: (job := queue.get(1)) is not None and job.posted_at is not None,
            timeout=60,
            what="the job marked as handled",
        )
        posts = [c for c in emu.calls if c.method == "POST" and c.path.endswith("/messages")]
        assert len(posts) == 1 and posts[0].status == 404
        assert "could not post" in ix.original.content


async def test_missing_permission_sends_the_result_by_dm_and_says_so_on_the_status(setup):
    emu, config, queue, worker = setup
    emu.revoke_permissions(emu.general)
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "no rights"})
        await ix.wait_ack()
        await emu.wait_for(
            lambda: "direct message" in ix.original.content and queue.get(1).posted_at,
            timeout=60,
            what="the DM shown and recorded",
        )
        (dm,) = emu.dm_messages(emu.alice)
        assert dm.attachments and "could not post in #general" in dm.content
    assert queue.undelivered() == [] and results(emu) == []


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def test_after_the_token_expires_the_status_is_edited_in_the_channel(setup):
    emu, config, queue, worker = setup
    clock = Clock()
    async with bot_running(emu, config, queue, worker, clock=clock):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "later"})
        await ix.wait_response(lambda m: "queued" in m.content or "step" in m.content or "done" in m.content)
        clock.offset = timedelta(minutes=20)
        await emu.wait_for(lambda: "done" in ix.original.content, timeout=60, what="status done")
    edits = [c for c in emu.calls if c.method == "PATCH" and c.path.startswith("/channels/")]
    assert edits and all(c.status == 200 for c in edits)
