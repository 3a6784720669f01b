"""kill -9 of the bot process at every moment of a job's life, then a restart (issue 5 §1).

The bot runs as a real process (``tests/bot_process.py`` around ``python -m bot``) against the
Discord emulator running in this test's event loop, on a SQLite queue this test reads too.
After the last restart every job must have ended exactly once: one message in the channel
showing its result (or why it failed), one ping for its requester, a status message that says
how it ended. Slow (each bot start imports the engine), so marked ``slow``; CI runs it.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from bot_process import ROOT, BotProcess, write_config
from db.models import JobStatus
from db.queue import Queue
from db.session import make_engine, upgrade
from discord_emulator import Emulator, Message
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from pg_cluster import PgCluster, pg_cluster  # noqa: F401 - pg_cluster is a fixture
from processes import BUDGET, Logged, free_port, start_logged, until

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


def open_queue(url: str) -> Queue:
    db = make_engine(url)
    upgrade(db)
    return Queue(db, pending_limit=3)


def shows_job(message: Message, job_id: int) -> bool:
    """Whether ``message`` is a result (or failure notice) of job ``job_id``: its embed footer."""
    return any((embed.get("footer") or {}).get("text") == f"Job #{job_id}" for embed in message.embeds)


def posts_of(emu: Emulator, job_id: int) -> list[Message]:
    return [m for m in emu.channel_messages(emu.general) if shows_job(m, job_id)]


async def imagine(emu: Emulator, queue: Queue, member, **options) -> int:
    """``member`` runs /imagine; the job's id, once the bot has acknowledged and queued it."""
    before = {job.id for job in queue.pending_for(member.id)}
    ix = await emu.slash(member, "imagine", {"prompt": f"a lighthouse for {member.name}", **options})
    assert await ix.wait_ack() == 5 and ix.ack_latency < 3.0
    new = await emu.wait_for(
        lambda: [j.id for j in queue.pending_for(member.id) if j.id not in before],
        BUDGET,
        f"{member.name}'s job in the database",
    )
    return new[0]


def final_status(emu: Emulator, queue: Queue, job_id: int) -> bool:
    job = queue.get(job_id)
    message = emu.messages.get(job.status_message_id)
    return bool(message and ("done" in message.content or "failed" in message.content))


async def settled(emu: Emulator, queue: Queue, jobs, bot: BotProcess) -> None:
    """Until every job is recorded as posted and its status message says how it ended."""

    def state() -> str:
        return "; ".join(
            f"#{j} {queue.get(j).status.value} by {queue.get(j).worker_id} "
            f"posted={queue.get(j).posted_at is not None} final={final_status(emu, queue, j)}"
            for j in jobs
        )

    try:
        await until(
            lambda: all(queue.get(j).posted_at and final_status(emu, queue, j) for j in jobs),
            "every job posted and its status final",
            watched=bot.watched,
        )
    except AssertionError as e:
        raise AssertionError(f"jobs: {state()}\n{e}") from None  # e has the bot's log tail


def assert_each_job_ended_once(emu: Emulator, queue: Queue, jobs: dict[int, object]) -> None:
    """``jobs``: job id -> requester. One post and one ping per job; statuses say how it ended."""
    for job_id, member in jobs.items():
        job = queue.get(job_id)
        assert job.status in (JobStatus.done, JobStatus.failed), (job_id, job.status)
        assert job.posted_at is not None, job_id
        posts = posts_of(emu, job_id)
        assert len(posts) == 1, f"job {job_id} posted {len(posts)} times"
        post = posts[0]
        assert post.pinged_users == {member.id}
        if job.status is JobStatus.done:
            assert [a.filename for a in post.attachments] == [f"sd_{job_id}_{job.seed}.png"]
        else:  # the member sees why
            assert job.error and "failed" in post.content and job.error.split(":")[0] in post.content
        status = emu.messages[job.status_message_id]
        assert ("done" if job.status is JobStatus.done else "failed") in status.content, status.content
        assert not status.pinged
    # Nobody was pinged by anything but the one result of each of their jobs.
    assert sorted(m.id for m in emu.pings()) == sorted(posts_of(emu, j)[0].id for j in jobs)


def png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, "PNG")
    return out.getvalue()


async def test_bot_killed_while_jobs_run_and_wait(emulator: Emulator, tiny_sd_folder, tmp_path):
    """The bot runs the engine in its own process (``engine.process = "bot"``); it is killed twice
    while a job is running (others queued). The job is retried once and then fails with the
    reason; the others are posted."""
    emu = emulator
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    config = write_config(
        tmp_path / "config.toml", emu.guild.id, tiny_sd_folder, url, max_attempts=2, engine_process="bot"
    )
    queue = open_queue(url)
    bot = BotProcess(emu, config, tmp_path / "bot.log")
    try:
        await bot.start()
        long = await imagine(emu, queue, emu.alice, steps=500)
        jobs = {
            long: emu.alice,
            await imagine(emu, queue, emu.bob, seed=1): emu.bob,
            await imagine(emu, queue, emu.mod, seed=2): emu.mod,
        }

        def long_job_running() -> bool:  # in the engine, so the kill costs it an attempt
            job = queue.get(long)
            return job.status is JobStatus.running and job.engine_started_at is not None

        for _ in range(2):  # the first attempt, then the retry
            await until(long_job_running, "the long job to run", watched=bot.watched)
            await bot.kill()
            await bot.start()
        await settled(emu, queue, jobs, bot)

        assert queue.get(long).status is JobStatus.failed and queue.get(long).attempts == 2
        assert "Gave up after 2 attempts" in posts_of(emu, long)[0].content
        assert_each_job_ended_once(emu, queue, jobs)
        assert await bot.stop() == 0
    finally:
        await bot.stop()
        queue.close()


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_the_bots_engine_process_stops_with_a_killed_bot_and_comes_back_after_a_crash(
    emulator: Emulator, tiny_sd_folder, tmp_path
):
    """The default: the bot runs its engine as the child ``python -m engine worker``. Progress
    reaches the status message over the link. kill -9 of the bot: the child sees it go, gives the
    running job back (no attempt spent) and exits. kill -9 of the child: the bot starts another,
    which takes the job up again. Every job is posted once."""
    emu = emulator
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    config = write_config(tmp_path / "config.toml", emu.guild.id, tiny_sd_folder, url, max_attempts=2)
    port = free_port()
    config.write_text(config.read_text() + f"[ops]\nenabled = true\nport = {port}\n")
    queue = open_queue(url)
    bot = BotProcess(emu, config, tmp_path / "bot.log")
    try:
        await bot.start()
        (engine,) = children(bot.process.pid)
        # torch and the model live in the child: the bot's own process never loads them.
        assert "libtorch" not in Path(f"/proc/{bot.process.pid}/maps").read_text()
        assert "libtorch" in Path(f"/proc/{engine}/maps").read_text()
        long = await imagine(emu, queue, emu.alice, steps=500)
        jobs = {long: emu.alice, await imagine(emu, queue, emu.bob, seed=1): emu.bob}

        def long_job_shows_its_steps() -> bool:
            job = queue.get(long)
            status = emu.messages.get(job.status_message_id)
            return job.engine_started_at is not None and status is not None and "step" in status.content

        await until(long_job_shows_its_steps, "the long job's progress on its status message", watched=bot.watched)
        await bot.kill()
        await until(lambda: not alive(engine), "the engine process to stop after the bot was killed")
        job = queue.get(long)
        assert job.status is JobStatus.queued and job.attempts == 0, (job.status, job.attempts)

        await bot.start()
        (engine,) = children(bot.process.pid)
        await until(
            lambda: queue.get(long).engine_started_at is not None, "the long job to run again", watched=bot.watched
        )
        os.kill(engine, signal.SIGKILL)  # as the kernel's out-of-memory killer would
        await until(
            lambda: [pid for pid in children(bot.process.pid) if pid != engine],
            "the bot to start its engine again",
            watched=bot.watched,
        )
        await settled(emu, queue, jobs, bot)
        assert queue.get(long).status is JobStatus.done
        assert_each_job_ended_once(emu, queue, jobs)
        # The bot's /metrics counts what its child finished (told over the link).
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            done = re.search(r'^sdbot_jobs_finished_total\{status="done"\} (\S+)$', response.read().decode(), re.M)
        assert done and float(done[1]) >= 1, "the child's finished jobs are not in the bot's metrics"
        (engine,) = children(bot.process.pid)
        assert await bot.stop() == 0
        assert not alive(engine), "the engine process outlived the bot"
        assert "engine process" in bot.log_path.read_text()
    finally:
        await bot.stop()
        queue.close()


async def test_bot_killed_before_and_while_posting(emulator: Emulator, tmp_path):
    """A bot without an engine (workers elsewhere: here, this test) is killed with jobs queued,
    with results stored but not posted, and while posting (the message was made but the answer
    lost). After each restart nothing is lost and nothing is posted twice."""
    emu = emulator
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    config = write_config(tmp_path / "config.toml", emu.guild.id, tmp_path / "no-model", url)
    queue = open_queue(url)
    bot = BotProcess(emu, config, tmp_path / "bot.log", no_engine=True)

    def finish(job_id: int, error: str | None = None) -> None:
        """What a GPU worker in another process does."""
        assert queue.claim("gpu-elsewhere").id == job_id
        if error:
            queue.fail(job_id, "gpu-elsewhere", error)
        else:
            queue.complete(job_id, "gpu-elsewhere", [(png("red"), queue.get(job_id).seed)])

    try:
        await bot.start()
        jobs = {}
        for member in (emu.alice, emu.bob, emu.mod, emu.alice):
            jobs[await imagine(emu, queue, member)] = member
        first, second, third, fourth = jobs

        # Killed with every job queued; two finish (one fails) while the bot is down.
        await bot.kill()
        finish(first)
        finish(second, "Out of memory: the image did not fit on the GPU")

        # Restarted, it posts the first, but Discord's answer is lost after the message was made;
        # killed while retrying.
        lost_answers = emu.fail_next("POST", "/channels/*/messages", 500, count=1000, after=True)
        await bot.start()
        await emu.wait_for(lambda: posts_of(emu, first), BUDGET, "the post")
        await bot.kill()
        assert lost_answers.hits and not queue.get(first).posted_at
        emu.faults.clear()

        # Restarted: it posts again with the same nonces; Discord gives back the messages made.
        await bot.start()
        await until(lambda: queue.get(first).posted_at and queue.get(second).posted_at, "records", watched=bot.watched)

        # A result stored while the bot is up, which cannot post it (Discord down); killed.
        outage = emu.fail_next("POST", "/channels/*/messages", 503, count=1000)
        finish(third)
        await emu.wait_for(lambda: outage.hits, BUDGET, "a posting attempt")
        await bot.kill()
        assert not posts_of(emu, third) and not queue.get(third).posted_at
        emu.faults.clear()

        # Posted, but killed before the status message could say so (its edits fail).
        stuck = emu.fail_next("PATCH", "/webhooks/*/messages/@original", 503, count=1000)
        finish(fourth)
        await bot.start()
        await emu.wait_for(lambda: posts_of(emu, third) and stuck.hits, BUDGET, "the post")
        await bot.kill()
        assert not queue.get(third).posted_at
        emu.faults.clear()

        await bot.start()
        await settled(emu, queue, jobs, bot)
        assert_each_job_ended_once(emu, queue, jobs)
        assert await bot.stop() == 0
    finally:
        await bot.stop()
        queue.close()


def start_worker(config: Path, name: str, log_path: Path) -> Logged:
    """``python -m engine worker``: a GPU machine serving the shared queue."""
    return start_logged(
        name,
        [sys.executable, "-m", "engine", "worker", "--config", str(config), "--name", name],
        log_path,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
    )


async def test_bot_and_two_workers_on_postgresql_one_worker_killed(
    emulator: Emulator, pg_url, tiny_sd_folder, tmp_path
):
    """Issue 5 §6: a bot without a GPU and two worker processes share a PostgreSQL queue; one
    worker is killed in the middle of a job, whose lease runs out and which the other worker
    then makes. Every job is posted exactly once, by the bot.

    The second worker starts once the first runs a job: started together, whichever finished
    its cold start first could make every job before the other was ready."""
    emu = emulator
    config = write_config(tmp_path / "config.toml", emu.guild.id, tiny_sd_folder, pg_url, max_batch=2, lease_seconds=5)
    queue = open_queue(pg_url)
    workers = {"doomed": start_worker(config, "doomed", tmp_path / "doomed.log")}
    bot = BotProcess(emu, config, tmp_path / "bot.log", no_engine=True)
    try:
        await bot.start()
        jobs = {}
        for member in (emu.alice, emu.bob, emu.mod) * 2:
            jobs[await imagine(emu, queue, member, steps=40)] = member

        def doomed_jobs() -> list[int]:
            return [
                j
                for j in jobs
                if queue.get(j).status is JobStatus.running
                and queue.get(j).engine_started_at is not None
                and "/doomed#" in (queue.get(j).worker_id or "")
            ]

        await until(doomed_jobs, "the doomed worker to run a job", watched=[workers["doomed"], *bot.watched])
        workers["doomed"].kill()
        taken = doomed_jobs()  # after the kill: the jobs it can no longer finish
        workers["survivor"] = start_worker(config, "survivor", tmp_path / "survivor.log")

        await until(
            lambda: all(queue.get(j).posted_at and final_status(emu, queue, j) for j in jobs),
            "every job posted and its status final",
            watched=[workers["survivor"], *bot.watched],
        )
        assert_each_job_ended_once(emu, queue, jobs)
        assert all(queue.get(j).status is JobStatus.done for j in jobs)
        assert taken and all(queue.get(j).attempts == 2 and "/survivor#" in queue.get(j).worker_id for j in taken)
        workers["survivor"].process.send_signal(signal.SIGTERM)
        assert workers["survivor"].exit_status() == 0
        assert await bot.stop() == 0
    finally:
        for worker in workers.values():
            worker.kill()
        await bot.stop()
        queue.close()


async def test_the_bot_and_its_engine_process_ride_out_a_postgresql_restart(
    emulator: Emulator, pg_cluster: PgCluster, tiny_sd_folder, tmp_path
):
    """The default layout (the engine as the bot's child) on a PostgreSQL server that is stopped
    while a job runs and started again: nothing exits, the log says once that the database is
    gone and once that it is back, and the job running then and one sent after are posted once."""
    emu = emulator
    config = write_config(tmp_path / "config.toml", emu.guild.id, tiny_sd_folder, pg_cluster.url)
    queue = open_queue(pg_cluster.url)
    bot = BotProcess(emu, config, tmp_path / "bot.log")
    try:
        await bot.start()
        (engine,) = children(bot.process.pid)
        first = await imagine(emu, queue, emu.alice, steps=200)
        await until(lambda: queue.get(first).engine_started_at is not None, "the job to run", watched=bot.watched)
        pg_cluster.stop()
        await until(
            lambda: "database unreachable" in bot.log_path.read_text(), "the outage in the log", watched=bot.watched
        )
        pg_cluster.start()
        jobs = {first: emu.alice, await imagine(emu, queue, emu.bob, seed=1): emu.bob}
        await settled(emu, queue, jobs, bot)
        assert_each_job_ended_once(emu, queue, jobs)
        assert bot.process.poll() is None and alive(engine), "the bot or its engine process exited"
        text = bot.log_path.read_text()
        assert text.count("database unreachable") == 1 and text.count("database reachable again") == 1, text
        assert "Traceback" not in text, text  # an outage is said in one line, not a traceback per retry
        assert await bot.stop() == 0
    finally:
        await bot.stop()
        queue.close()
        queue.engine.dispose()
