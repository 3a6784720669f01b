"""Kill trials (issue 10 §1): the bot is killed with SIGKILL while members' commands arrive.

Each trial starts the bot (``python -m bot --no-engine`` on SQLite, through tests/bot_process.py,
against the local emulator in this process), sends a few /imagine commands, kills the bot at a
random moment while they are being handled, starts it again and waits until it has settled. A
command is *lost* when Discord showed it as acknowledged ("thinking…") and yet, after the
restart, no job exists for it and nobody answered it. It prints trials, commands, acknowledged,
jobs, lost and duplicated (two jobs for one command), and exits non-zero if any was lost.

    python bench/kill_trials.py --trials 30 --commands 3

Run it from a checkout: it uses that checkout's code (``PYTHONPATH`` set to it for the bot).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])

from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from bot_process import BotProcess, write_config  # noqa: E402
from db.models import Job  # noqa: E402
from db.session import make_engine, upgrade  # noqa: E402
from discord_emulator import Emulator  # noqa: E402

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
        interactions = []
        for _ in range(args.trials):
            interactions += await trial(emu, bot, members, args.commands, rng)
        tokens = jobs_by_token(db)
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
        f"code={ROOT} trials={args.trials} commands={len(interactions)} acknowledged={len(acked)} "
        f"jobs={len(with_job)} answered-after-restart={len(answered)} lost={len(lost)} "
        f"duplicated={len(duplicated)}"
    )
    print(f"bot (--no-engine) resident memory after start: max {max(RSS):.0f} MiB over {len(RSS)} starts")
    return 1 if lost or duplicated else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--commands", type=int, default=3, help="commands sent per trial")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
