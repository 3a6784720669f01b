"""No acknowledged command without a job: the job is stored before the acknowledgement (when the
database answers in time), and an interaction acknowledged early (slow checks) is journaled and
answered after a crash."""

from __future__ import annotations

import threading

import pytest

import bot.service
from bot.acks import RESTARTED
from bot.journal import InteractionJournal, journal_path
from bot_harness import bot_config, bot_running, new_queue
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue
    engine.dispose()


async def test_the_job_is_stored_before_the_interaction_is_acknowledged(setup, monkeypatch):
    emu, config, queue = setup
    acknowledged_at_enqueue = []
    real = type(queue).enqueue_many

    def enqueue_many(self, many):
        acknowledged_at_enqueue.append(any(c.path.endswith("/callback") for c in emu.calls))
        return real(self, many)

    monkeypatch.setattr(type(queue), "enqueue_many", enqueue_many)
    # The first count of prompt tokens builds the tokenizer (seconds): that is the slow path below.
    monkeypatch.setattr(bot.service, "check_prompt_text", lambda prompt, negative, lora_dir: None)
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse"})
        await ix.wait_response(lambda m: "queued" in m.content)
    assert acknowledged_at_enqueue == [False]
    assert len(queue.pending_for(emu.alice.id)) == 1


async def test_an_interaction_acknowledged_before_its_job_is_answered_after_a_crash(setup, monkeypatch):
    emu, config, queue = setup
    release = threading.Event()

    def stuck_check(prompt, negative, lora_dir):
        release.wait(600)  # the check outlives the bot: it "crashes" while the member waits
        return None

    monkeypatch.setattr(bot.service, "check_prompt_text", stuck_check)
    try:
        async with bot_running(emu, config, queue, None):
            ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse"})
            assert await ix.wait_ack() == 5  # "thinking…", with no job yet
            journal = journal_path(config.queue)
            assert journal.stat().st_size > 0  # journaled before the acknowledgement
        assert queue.pending_for(emu.alice.id) == []
        assert [entry.token for entry in InteractionJournal(journal).load()] == [ix.token]
        async with bot_running(emu, config, queue, None):
            await emu.wait_for(
                lambda: ix.original is not None and ix.original.content == RESTARTED,
                what="the stranded interaction answered",
                timeout=120,
            )
        assert InteractionJournal(journal).load() == []
    finally:
        release.set()


async def test_a_slow_check_that_queues_leaves_no_record(setup, monkeypatch):
    emu, config, queue = setup
    from bot.checks import PREPARE_BUDGET

    def slow_check(prompt, negative, lora_dir):
        threading.Event().wait(PREPARE_BUDGET + 0.5)
        return None

    monkeypatch.setattr(bot.service, "check_prompt_text", slow_check)
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse"})
        await ix.wait_response(lambda m: "queued" in m.content)
        journal = journal_path(config.queue)
        await emu.wait_for(lambda: journal.stat().st_size == 0, what="the journal entry closed", timeout=120)
    assert len(queue.pending_for(emu.alice.id)) == 1
