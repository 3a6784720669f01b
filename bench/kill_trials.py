"""Kill trials (issue 10 §1): the bot is killed with SIGKILL while members' commands arrive.

Each trial starts the bot (``python -m bot --no-engine`` on SQLite, through tests/bot_process.py,
against the local emulator in this process), sends a few /imagine commands, kills the bot at a
random moment while they are being handled, starts it again and waits until it has settled. A
command is *lost* when Discord showed it as acknowledged ("thinking…") and yet, after the
restart, no job exists for it and nobody answered it. It prints trials, commands, acknowledged,
jobs, lost and duplicated (two jobs for one command), and exits non-zero if any was lost.

``--lock SECONDS`` (issue 20): in each trial another process holds SQLite's write lock from
before the commands until SECONDS after it was taken, through the kill and the restart; then this
script makes the jobs (as a GPU worker elsewhere would) and waits until each is posted. It also
prints how many commands were answered within Discord's 3 s and how many jobs were posted once.

    python bench/kill_trials.py --trials 30 --commands 3
    python bench/kill_trials.py --trials 6 --commands 3 --lock 10

Run it from a checkout: it uses that checkout's code (``PYTHONPATH`` set to it for the bot).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])

from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from bot_process import BotProcess, write_config  # noqa: E402
from db.models import Job  # noqa: E402
from db.queue import Queue  # noqa: E402
from db.session import make_engine, upgrade  # noqa: E402
from discord_emulator import Emulator  # noqa: E402
from processes import WriteLock  # noqa: E402

DEADLINE = 3.0  # seconds Discord gives a bot to acknowledge an interaction

#: What a restarted bot says to an interaction it acknowledged before its job was stored.
RESTARTED = "restarted before your job was queued"


def jobs_by_token(db) -> dict[str, int]:
    with Session(db) as session:
        rows = session.execute(select(Job.interaction_token, func.count()).group_by(Job.interaction_token))
        return {token: n for token, n in rows if token}


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid`` (Linux), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


RSS: list[float] = []


async def trial(emu: Emulator, bot: BotProcess, members, n: int, rng: random.Random) -> list:
    await bot.start()
    await emu.wait_for(lambda: "imagine" in emu.command_names(), 120, "the bot's commands")
    RSS.append(rss_mib(bot.process.pid))
    await asyncio.sleep(3.0)  # discord.py is ready guild_ready_timeout (2 s) after its guilds arrive
    sent = []
    # The kill lands the moment Discord sees one of the commands acknowledged: the window where an
    # acknowledgement made before its job was stored would strand the member.
    victim = rng.randrange(n)
    for i in range(n):
        sent.append(await emu.slash(rng.choice(members), "imagine", {"prompt": f"trial {i}"}))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
    await emu.wait_for(lambda: sent[victim].response_type is not None, 30, "the chosen command's ack")
    await bot.kill()
    await bot.start()  # the restart answers what the killed run acknowledged without a job
    await emu.wait_for(lambda: "imagine" in emu.command_names(), 120, "the bot's commands again")
    await asyncio.sleep(2.0)  # let the restarted bot's start-up answers land (a benchmark, not a test)
    await bot.stop()
    return sent


def png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, "PNG")
    return out.getvalue()


async def locked_trial(emu: Emulator, bot: BotProcess, members, n: int, rng: random.Random, args, queue: Queue):
    """A trial whose commands, kill and restart all happen while another process holds the lock;
    then the jobs are made here and posted by the bot."""
    await bot.start()
    await emu.wait_for(lambda: "imagine" in emu.command_names(), 120, "the bot's commands")
    RSS.append(rss_mib(bot.process.pid))
    await asyncio.sleep(3.0)
    lock = WriteLock(Path(queue.engine.url.database))
    sent = []
    victim = rng.randrange(n)
    for i in range(n):
        sent.append(await emu.slash(rng.choice(members), "imagine", {"prompt": f"locked trial {i}"}))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
    await emu.wait_for(lambda: sent[victim].response_type is not None, 30, "the chosen command's ack")
    await asyncio.sleep(rng.uniform(0.0, 1.0))  # the kill lands while the jobs wait on the lock
    await bot.kill()
    await bot.start()
    await emu.wait_for(lambda: "imagine" in emu.command_names(), 120, "the bot's commands again")
    await lock.release(after=args.lock)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # as a GPU worker elsewhere: make what the bot queued
        while (job := queue.claim("bench-worker")) is not None:
            queue.complete(job.id, "bench-worker", [(png(), job.seed)])
        acked = [ix for ix in sent if ix.response_type == 5]
        stored = jobs_by_token(queue.engine)
        posted = all(posted_at(queue, ix.token) for ix in acked if stored.get(ix.token))
        if all(stored.get(ix.token) for ix in acked) and posted:  # else counted below, as lost
            break
        await asyncio.sleep(0.5)
    await bot.stop()
    return sent


def posted_at(queue: Queue, token: str):
    with Session(queue.engine) as session:
        return session.scalar(select(Job.posted_at).where(Job.interaction_token == token))


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sdbot-kill-"))
    database_url = f"sqlite:///{tmp}/kill.sqlite3"
    rng = random.Random(args.seed)
    async with Emulator() as emu:
        members = [emu.add_user(f"member{i}") for i in range(8)]
        config = write_config(tmp / "config.toml", emu.guild.id, tmp / "unused-model", database_url, pending_limit=100)
        db = make_engine(database_url)
        upgrade(db)
        bot = BotProcess(emu, config, tmp / "bot.log", no_engine=True)
        queue = Queue(db, pending_limit=100)
        interactions = []
        for _ in range(args.trials):
            if args.lock:
                interactions += await locked_trial(emu, bot, members, args.commands, rng, args, queue)
            else:
                interactions += await trial(emu, bot, members, args.commands, rng)
        tokens = jobs_by_token(db)
        in_time = [ix for ix in interactions if ix.ack_latency is not None and ix.ack_latency < DEADLINE]
        posts = collections.Counter(
            embed["footer"]["text"]
            for m in emu.channel_messages(emu.general)
            for embed in m.embeds
            if (embed.get("footer") or {}).get("text", "").startswith("Job #")
        )
        with Session(db) as session:
            ids = [i for (i,) in session.execute(select(Job.id).where(Job.interaction_token.is_not(None)))]
        posted_once = sum(1 for i in ids if posts[f"Job #{i}"] == 1)
        posted_twice = sum(1 for i in ids if posts[f"Job #{i}"] > 1)
        acked = [ix for ix in interactions if ix.response_type is not None]
        with_job = [ix for ix in interactions if tokens.get(ix.token)]
        answered = [
            ix for ix in acked if not tokens.get(ix.token) and any(RESTARTED in (m.content or "") for m in ix.messages)
        ]
        lost = [
            ix
            for ix in acked
            if not tokens.get(ix.token) and ix not in answered and not any(m.ephemeral for m in ix.messages)
        ]  # an ephemeral answer is a refusal
        duplicated = [ix for ix in interactions if tokens.get(ix.token, 0) > 1]
        db.dispose()
    print(
        f"code={ROOT} trials={args.trials} lock={args.lock or 'none'} commands={len(interactions)} "
        f"answered-within-3s={len(in_time)} acknowledged={len(acked)} "
        f"jobs={len(with_job)} answered-after-restart={len(answered)} lost={len(lost)} "
        f"duplicated={len(duplicated)}"
        + (f" posted-once={posted_once} posted-twice={posted_twice}" if args.lock else "")
    )
    print(f"bot (--no-engine) resident memory after start: max {max(RSS):.0f} MiB over {len(RSS)} starts")
    late = args.lock and len(in_time) < len(interactions)
    return 1 if lost or duplicated or late or (args.lock and posted_twice) else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--commands", type=int, default=3, help="commands sent per trial")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--lock", type=float, default=0, help="seconds another process holds SQLite's write lock in each trial"
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
