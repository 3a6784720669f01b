"""Load script (issue 5 §7): many slash commands from many members through the real bot.

Two processes, as in a deployment: this one plays Discord (the local emulator: gateway and REST
over sockets) and its members; the other is the bot itself, ``python -m bot`` (through
``tests/bot_process.py``, which only points discord.py at the emulator), with its engine (by
default its child process, as the README's run command starts it; ``--engine``) on the
tiny random model (64x64, 2 steps, max_batch 16, CPU) and a temporary SQLite queue. Members send
/imagine (each member's commands spread over the run); the script prints how fast commands were
acknowledged, the p50/p99 time to acknowledge (Discord's deadline is 3 s) as the emulator saw it,
and checks that every job completed and was posted exactly once, with one ping each.

    python bench/load.py --rate 100               # 1,000 commands from 200 members, 100 a second
    python bench/load.py --commands 200 --members 50 --rate 0     # all at once

A script, not a test: it prints its numbers, and exits non-zero if a command was not acknowledged
in time or a job was lost or posted twice.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sqlalchemy import func, select  # noqa: E402

from bot_process import BotProcess, write_config  # noqa: E402
from db.models import Job, JobStatus  # noqa: E402
from db.queue import Queue  # noqa: E402
from db.session import make_engine, upgrade  # noqa: E402
from discord_emulator import Emulator  # noqa: E402
from processes import start_logged  # noqa: E402

DEADLINE = 3.0  # seconds Discord gives a bot to acknowledge an interaction


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument(
        "--rate",
        type=float,
        default=100,
        help="commands sent per second (0: all at once, as fast as the emulator sends)",
    )
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for every job to be posted")
    parser.add_argument(
        "--engine",
        choices=("child", "in-bot", "worker"),
        default="child",
        help="child: the bot starts its engine as a child process (the default, engine.process = worker); "
        "in-bot: the engine in the bot's process (engine.process = bot); worker: `python -m engine worker` "
        "started by this script beside a bot with --no-engine",
    )
    parser.add_argument(
        "--acks-only", action="store_true", help="stop after the acknowledgements (the ack path alone, quicker)"
    )
    return parser.parse_args()


def posted_count(queue: Queue) -> int:
    with queue.engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(Job).where(Job.posted_at.is_not(None)))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def main(args: argparse.Namespace) -> int:
    from tinymodel import save_diffusers_folder

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="sdbot-load-"))
    model_dir = save_diffusers_folder(tmp / "tiny-sd1", "sd1")
    database_url = f"sqlite:///{tmp}/load.sqlite3"
    per_member = -(-args.commands // args.members)

    async with Emulator() as emu:
        members = [emu.add_user(f"member{i}") for i in range(args.members)]
        config = write_config(
            tmp / "config.toml",
            emu.guild.id,
            model_dir,
            database_url,
            max_batch=args.max_batch,
            pending_limit=max(3, per_member),
            progress_interval=1.0,
            engine_process="bot" if args.engine == "in-bot" else "worker",
        )
        db = make_engine(database_url)
        upgrade(db)
        queue = Queue(db, pending_limit=max(3, per_member))  # read here; the bot writes
        bot = BotProcess(emu, config, tmp / "bot.log", no_engine=args.engine == "worker")
        worker = None
        if args.engine == "worker":
            worker = start_logged(
                "worker",
                [sys.executable, "-m", "engine", "worker", "--config", str(config), "--name", "load"],
                tmp / "worker.log",
                cwd=ROOT,
            )
        await bot.start(timeout=120)
        try:
            await emu.wait_for(lambda: "imagine" in emu.command_names(), 60, "the bot's commands")
            return await drive(emu, queue, members, args)
        finally:
            status = await bot.stop()
            print(f"bot stopped with exit status {status}; its log: {tmp / 'bot.log'}")
            if worker is not None:
                worker.process.terminate()
                print(f"worker stopped with exit status {worker.process.wait(60)}; its log: {tmp / 'worker.log'}")
            queue.close()
            db.dispose()


async def drive(emu: Emulator, queue: Queue, members, args: argparse.Namespace) -> int:
    # Member i sends its k-th command in round k: every member has one job waiting per round.
    order = [members[i % len(members)] for i in range(args.commands)]
    interactions = []
    started = time.monotonic()
    for n, member in enumerate(order):
        interactions.append(await emu.slash(member, "imagine", {"prompt": f"load test {n}", "seed": n}))
        if args.rate:
            await asyncio.sleep(max(0.0, started + (n + 1) / args.rate - time.monotonic()))
    sent = time.monotonic() - started

    acked = 0

    def all_acknowledged() -> bool:  # checked on every emulator event: resume where it stopped
        nonlocal acked
        while acked < len(interactions) and interactions[acked].response_type is not None:
            acked += 1
        return acked == len(interactions)

    try:
        await emu.wait_for(all_acknowledged, 30, "every ack")
    except TimeoutError:
        pass  # counted below: Discord would have shown "The application did not respond"
    acked_after = time.monotonic() - started
    latencies = [ix.ack_latency for ix in interactions if ix.ack_latency is not None]
    late = [ix for ix in interactions if ix.ack_latency is None or ix.ack_latency >= DEADLINE]
    refused = [ix for ix in interactions if ix.response_type != 5]

    print(
        f"commands={args.commands} members={args.members} rate={args.rate or 'burst'} "
        f"max_batch={args.max_batch} size=64x64 steps=2 cores={os.cpu_count()} engine={args.engine} "
        "(the bot in its own process)"
    )
    print(
        f"sent in {sent:.2f} s; all acknowledged after {acked_after:.2f} s: "
        f"{len(latencies) / acked_after:.1f} commands/s acknowledged"
    )
    print(
        f"time to acknowledge: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        f"(mean {statistics.fmean(latencies) * 1000:.0f} ms; Discord's deadline {DEADLINE * 1000:.0f} ms)"
    )
    print(f"not acknowledged within the deadline: {len(late)}; acknowledged but not deferred: {len(refused)}")
    if args.acks_only:
        return 0 if not late and not refused else 1
    job_ids = range(1, args.commands + 1)
    deadline = time.monotonic() + args.timeout
    while True:  # one count per look: polling job by job would take the bot's CPU from it
        waiting = args.commands - posted_count(queue)
        if not waiting:
            break
        if time.monotonic() > deadline:
            print(f"timed out: {waiting} jobs not posted")
            return 1
        await asyncio.sleep(0.5)
    finished = time.monotonic() - started

    posts = collections.Counter(
        embed["footer"]["text"]
        for m in emu.channel_messages(emu.general)
        for embed in m.embeds
        if (embed.get("footer") or {}).get("text", "").startswith("Job #")
    )
    stored = [queue.get(j) for j in job_ids]
    done = sum(1 for job in stored if job is not None and job.status is JobStatus.done)
    once = sum(1 for j in job_ids if posts[f"Job #{j}"] == 1)
    twice = sum(1 for j in job_ids if posts[f"Job #{j}"] > 1)
    pings = collections.Counter(user for m in emu.pings() for user in m.pinged_users)
    pinged_once = pings == collections.Counter(m.id for m in order)

    print(f"every job finished and posted after {finished:.1f} s: {args.commands / finished:.1f} jobs/s")
    print(
        f"jobs done: {done}/{args.commands}; posted exactly once: {once}; posted more than once: {twice}; "
        f"pinged once per job: {pinged_once}"
    )
    ok = done == once == args.commands and not twice and not late and not refused and pinged_once
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
