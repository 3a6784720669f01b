"""Load script (issue 5 §7): many slash commands from many members through the real bot.

The real discord.py client runs in this process against the local Discord emulator (sockets,
gateway and REST), with the engine on the tiny random model (64x64, 2 steps, max_batch 16) and
a temporary SQLite queue. Members send /imagine (each member's commands spread over the run);
the script prints how fast commands were acknowledged, the p50/p99 time to acknowledge
(Discord's deadline is 3 s), and checks that every job completed and was posted exactly once.

    python bench/load.py                          # 1,000 commands from 200 members
    python bench/load.py --commands 200 --members 50 --rate 100

A script, not a test: it prints its numbers, and exits non-zero if a job was lost or posted twice.
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

from dataclasses import replace  # noqa: E402

from bot_harness import bot_config, make_bot, new_queue  # noqa: E402
from db.models import JobStatus  # noqa: E402
from discord_emulator import Emulator, patch_discord, running  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--rate", type=float, default=0,
                        help="commands sent per second (0: all at once, as fast as the emulator sends)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for every job to be posted")
    return parser.parse_args()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def main(args: argparse.Namespace) -> int:
    import torch

    from engine.loading import load_model
    from engine.worker import EngineWorker
    from tinymodel import save_diffusers_folder

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="sdbot-load-"))
    model_dir = save_diffusers_folder(tmp / "tiny-sd1", "sd1")
    model = load_model(str(model_dir), device="cpu", dtype=torch.float32, name="tiny-sd1", progress=False)
    per_member = -(-args.commands // args.members)

    async with Emulator() as emu:
        members = [emu.add_user(f"member{i}") for i in range(args.members)]
        config = bot_config(str(model_dir), f"sqlite:///{tmp}/load.sqlite3", emu.guild.id)
        config = replace(config, engine=replace(config.engine, max_batch=args.max_batch, preview_every=0),
                         queue=replace(config.queue, pending_limit=max(3, per_member)),
                         discord=replace(config.discord, progress_interval=1.0))
        db, queue = new_queue(tmp / "load.sqlite3", config)
        worker = EngineWorker(model, config.engine, config.generation)
        worker.start()
        try:
            with patch_discord(emu):
                async with running(make_bot(config, queue, worker), emu):
                    return await drive(emu, queue, members, args)
        finally:
            worker.stop()
            queue.close()
            db.dispose()


async def drive(emu: Emulator, queue, members, args: argparse.Namespace) -> int:
    # Member i sends its k-th command in round k: every member has one job waiting per round.
    order = [members[i % len(members)] for i in range(args.commands)]
    interactions = []
    started = time.monotonic()
    for n, member in enumerate(order):
        interactions.append(await emu.slash(member, "imagine", {"prompt": f"load test {n}", "seed": n}))
        if args.rate:
            await asyncio.sleep(max(0.0, started + (n + 1) / args.rate - time.monotonic()))
    sent = time.monotonic() - started
    # One broad condition (the emulator rescans on every request it serves).
    try:
        await emu.wait_for(lambda: all(ix.response_type is not None for ix in interactions), 30, "every ack")
    except TimeoutError:
        pass  # counted below: Discord would have shown "The application did not respond"
    acked = time.monotonic() - started
    latencies = [ix.ack_latency for ix in interactions if ix.ack_latency is not None]
    refused = [ix for ix in interactions if ix.response_type != 5]

    deadline = time.monotonic() + args.timeout
    while True:
        jobs = queue.undelivered()
        waiting = sum(len(queue.pending_for(m.id)) for m in members)
        if not jobs and not waiting:
            break
        if time.monotonic() > deadline:
            print(f"timed out: {waiting} jobs not finished, {len(jobs)} not posted")
            return 1
        await asyncio.sleep(0.5)
    finished = time.monotonic() - started

    posts = collections.Counter(
        embed["footer"]["text"] for m in emu.channel_messages(emu.general) for embed in m.embeds
        if (embed.get("footer") or {}).get("text", "").startswith("Job #"))
    job_ids = range(1, args.commands + 1)
    stored = [queue.get(j) for j in job_ids]
    done = sum(1 for job in stored if job is not None and job.status is JobStatus.done)
    once = sum(1 for j in job_ids if posts[f"Job #{j}"] == 1)
    twice = sum(1 for j in job_ids if posts[f"Job #{j}"] > 1)
    pings = collections.Counter(user for m in emu.pings() for user in m.pinged_users)

    print(f"commands={args.commands} members={args.members} rate={args.rate or 'burst'} "
          f"max_batch={args.max_batch} size=64x64 steps=2 cores={os.cpu_count()}")
    print(f"sent in {sent:.2f} s; all acknowledged after {acked:.2f} s: "
          f"{args.commands / acked:.1f} commands/s acknowledged")
    print(f"time to acknowledge: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
          f"(mean {statistics.fmean(latencies) * 1000:.0f} ms; Discord's deadline 3000 ms)")
    print(f"not acknowledged in time or not deferred: {len(refused)}")
    print(f"every job finished and posted after {finished:.1f} s: {args.commands / finished:.1f} jobs/s")
    print(f"jobs done: {done}/{args.commands}; posted exactly once: {once}; posted more than once: {twice}; "
          f"pinged once per job: {pings == collections.Counter(m.id for m in order)}")
    ok = (done == args.commands and once == args.commands and not twice and not refused
          and pings == collections.Counter(m.id for m in order))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
