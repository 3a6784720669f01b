"""Issue 20: a stalled or unreachable database never leaves a member without an answer.

The real bot process (``tests/bot_process.py`` around ``python -m bot --no-engine``), a real
database and the Discord emulator in this test's event loop; this test plays the GPU worker
(claims and completes the jobs) once the database is back. In each scenario every command is
answered within Discord's 3 seconds as the emulator measures it (from its dispatch to the
callback): acknowledged, or refused in words; every acknowledged command gets its job, or a
line saying it was not queued; every job is posted once; the log has no traceback.
"""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from PIL import Image

from bot.acks import NOT_SAVED, SAVED
from bot_process import BotProcess, write_config
from db.models import JobStatus
from db.queue import Queue
from db.session import make_engine, upgrade
from discord_emulator import Emulator, Interaction
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from pg_cluster import PgCluster, pg_cluster  # noqa: F401 - the fixture
from processes import WriteLock, until

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

DEADLINE = 3.0


def open_queue(url: str) -> Queue:
    db = make_engine(url)
    upgrade(db)
    return Queue(db, pending_limit=10)


async def command(emu: Emulator, member, prompt: str) -> Interaction:
    """``member`` runs /imagine; it must be answered within Discord's deadline."""
    ix = await emu.slash(member, "imagine", {"prompt": prompt})
    await emu.wait_for(lambda: ix.response_type is not None, 30, f"an answer to {prompt!r}")
    assert ix.ack_latency < DEADLINE, f"{prompt!r} answered after {ix.ack_latency:.2f} s"
    return ix


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, "PNG")
    return out.getvalue()


async def made_and_posted(emu: Emulator, queue: Queue, bot: BotProcess, acknowledged: list[Interaction]) -> None:
    """Each acknowledged command has one job; this test makes them; each is posted once, and its
    "thinking…" message became its status, which ends "done"."""
    jobs = {}
    for ix in acknowledged:
        jobs[ix.token] = await until(
            lambda ix=ix: [j for j in queue.pending_for(ix.user.id) if j.interaction_token == ix.token],
            f"the job of {ix.data['options'][0]['value']!r}",
            watched=bot.watched,
        )
        assert len(jobs[ix.token]) == 1
    while (job := queue.claim("gpu-elsewhere")) is not None:
        queue.complete(job.id, "gpu-elsewhere", [(png(), job.seed)])
    for ix in acknowledged:
        (job,) = jobs[ix.token]
        await until(
            lambda job=job, ix=ix: queue.get(job.id).posted_at and "done" in (ix.original.content or ""),
            f"job {job.id} posted and its status done",
            watched=bot.watched,
        )
        posts = [
            m
            for m in emu.channel_messages(emu.general)
            if any((e.get("footer") or {}).get("text") == f"Job #{job.id}" for e in m.embeds)
        ]
        assert len(posts) == 1, f"job {job.id} posted {len(posts)} times"
        assert queue.get(job.id).status is JobStatus.done


def assert_no_traceback(bot: BotProcess) -> str:
    text = bot.log_path.read_text()
    assert "Traceback" not in text, text[-6000:]
    return text


async def test_commands_during_a_10_s_sqlite_write_lock(emulator: Emulator, tmp_path):
    emu = emulator
    path = tmp_path / "queue.sqlite3"
    queue = open_queue(f"sqlite:///{path}")
    config = write_config(tmp_path / "config.toml", emu.guild.id, tmp_path / "no-model", f"sqlite:///{path}")
    bot = BotProcess(emu, config, tmp_path / "bot.log", no_engine=True)
    try:
        await bot.start()
        await emu.wait_for(lambda: "imagine" in emu.command_names(), 120, "the commands")
        lock = WriteLock(path)
        sent = [await command(emu, member, f"during the lock {n}") for n, member in enumerate((emu.alice, emu.bob))]
        assert all(ix.response_type == 5 for ix in sent)  # "thinking…": the job follows the lock
        await lock.release(after=10)
        await made_and_posted(emu, queue, bot, sent)
        assert_no_traceback(bot)
        assert await bot.stop() == 0
    finally:
        await bot.stop()
        queue.engine.dispose()


async def test_commands_during_a_40_s_sqlite_write_lock_and_a_kill(emulator: Emulator, tmp_path):
    """Past the busy timeout (30 s) the members are told their job is saved; the bot is killed
    and starts again while the lock is still held; the journal queues every job once."""
    emu = emulator
    path = tmp_path / "queue.sqlite3"
    queue = open_queue(f"sqlite:///{path}")
    config = write_config(tmp_path / "config.toml", emu.guild.id, tmp_path / "no-model", f"sqlite:///{path}")
    bot = BotProcess(emu, config, tmp_path / "bot.log", no_engine=True)
    try:
        await bot.start()
        await emu.wait_for(lambda: "imagine" in emu.command_names(), 120, "the commands")
        lock = WriteLock(path)
        before = [await command(emu, member, f"before the kill {n}") for n, member in enumerate((emu.alice, emu.bob))]
        assert all(ix.response_type == 5 for ix in before)
        await until(
            lambda: all(ix.original.content == SAVED for ix in before),
            "the members told their job is saved",
            watched=bot.watched,
        )
        await bot.kill()
        await bot.start()  # while the lock is still held: start-up writes nothing
        assert lock.process.poll() is None
        after = [await command(emu, emu.mod, "after the restart")]
        await lock.release(after=40)
        await made_and_posted(emu, queue, bot, before + after)
        text = assert_no_traceback(bot)
        assert "database unreachable" in text and "database reachable again" in text
        assert await bot.stop() == 0
    finally:
        await bot.stop()
        queue.engine.dispose()


async def test_commands_while_postgresql_is_stopped(emulator: Emulator, pg_cluster: PgCluster, tmp_path):
    """Stopped for 15 s: commands are refused in words, within the deadline; after, queued."""
    emu = emulator
    queue = open_queue(pg_cluster.url)
    config = write_config(tmp_path / "config.toml", emu.guild.id, tmp_path / "no-model", pg_cluster.url)
    config.write_text(config.read_text().replace("[queue]", f'[queue]\njournal_path = "{tmp_path / "journal"}"'))
    bot = BotProcess(emu, config, tmp_path / "bot.log", no_engine=True)
    try:
        await bot.start()
        await emu.wait_for(lambda: "imagine" in emu.command_names(), 120, "the commands")
        pg_cluster.stop()
        stopped = time.monotonic()
        during = [await command(emu, member, f"during the outage {n}") for n, member in enumerate((emu.alice, emu.bob))]
        for ix in during:  # refused in words (or, had the checks passed, saved for later)
            answer = await ix.wait_response(timeout=60)
            assert answer.content in (NOT_SAVED, SAVED), answer.content
        refused = [ix for ix in during if ix.messages[-1].content == NOT_SAVED]
        await asyncio.sleep(max(0.0, stopped + 15 - time.monotonic()))  # the outage's length
        pg_cluster.start()
        after = [await command(emu, emu.mod, "after the outage")]
        acknowledged = [ix for ix in during + after if ix not in refused]
        await made_and_posted(emu, queue, bot, acknowledged)
        for ix in refused:
            assert not [j for j in queue.pending_for(ix.user.id) if j.interaction_token == ix.token]
        text = assert_no_traceback(bot)
        assert text.count("database unreachable") == 1 and text.count("database reachable again") == 1, text
        assert await bot.stop() == 0
    finally:
        await bot.stop()
        queue.engine.dispose()


async def test_a_rate_limited_or_failed_interaction_callback_is_retried_in_time(emulator: Emulator, tmp_path):
    """429 (with Discord's body and headers), a 500 before the callback took effect, and a 500
    after it did (the answer lost): each command is acknowledged in time and its "thinking…"
    message becomes its job's status."""
    emu = emulator
    path = tmp_path / "queue.sqlite3"
    queue = open_queue(f"sqlite:///{path}")
    config = write_config(tmp_path / "config.toml", emu.guild.id, tmp_path / "no-model", f"sqlite:///{path}")
    bot = BotProcess(emu, config, tmp_path / "bot.log", no_engine=True)
    try:
        await bot.start()
        await emu.wait_for(lambda: "imagine" in emu.command_names(), 120, "the commands")
        sent = []
        for name, member, fault in (
            ("429", emu.alice, dict(status=429, retry_after=0.3)),
            ("500", emu.bob, dict(status=500)),
            ("500 after", emu.mod, dict(status=500, after=True)),
        ):
            injected = emu.fail_next("POST", "/interactions/*/callback", **fault)
            sent.append(await command(emu, member, f"callback {name}"))
            assert injected.hits == 1 and sent[-1].response_type == 5
        await made_and_posted(emu, queue, bot, sent)
        assert_no_traceback(bot)
        assert await bot.stop() == 0
    finally:
        await bot.stop()
        queue.engine.dispose()
