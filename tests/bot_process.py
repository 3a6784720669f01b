"""Run the real bot entry point in a process of its own, connected to a Discord emulator.

    EMULATOR_URL=http://127.0.0.1:PORT DISCORD_TOKEN=emulator-token \\
        python tests/bot_process.py --config config.toml [--no-engine]

The only change to discord.py is where it connects (shared/DISCORD.md §1, as
``discord_emulator.patch_discord`` does in-process): REST goes to the emulator's ``/api/v10`` and
the gateway to its ``/gateway``. Everything else is ``python -m bot`` itself, so a test can
``kill -9`` the bot and start it again exactly as an operator's process manager would.
``BotProcess`` does that from a test running the emulator on its own event loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from processes import EXIT_BUDGET, START_BUDGET, Logged, start_logged, until

ROOT = Path(__file__).resolve().parent.parent


def main(argv: Sequence[str]) -> int:
    import discord
    import yarl

    url = os.environ["EMULATOR_URL"].rstrip("/")
    discord.http.Route.BASE = f"{url}/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url.replace("http://", "ws://", 1) + "/gateway")

    from bot.__main__ import main as bot_main

    return bot_main(list(argv))


def write_config(
    path: Path,
    guild_id: int,
    model: Path,
    database_url: str,
    *,
    max_batch: int = 1,
    pending_limit: int = 3,
    max_attempts: int = 3,
    lease_seconds: int = 5,
    progress_interval: float = 0.5,
    engine_process: str = "worker",
) -> Path:
    """A config.toml for a bot process on the tiny model: 64x64, 2 steps, no previews; the engine
    in a child process (``engine_process = "bot"``: in the bot's own)."""
    path.write_text(f"""
[model]
source = "{model}"
name = "tiny-sd1"
[engine]
device = "cpu"
dtype = "float32"
max_batch = {max_batch}
preview_every = 0
process = "{engine_process}"
[generation]
default_steps = 2
max_steps = 500
default_width = 64
default_height = 64
max_width = 64
max_height = 64
sizes = ["64x64"]
[queue]
database_url = "{database_url}"
pending_limit = {pending_limit}
max_attempts = {max_attempts}
lease_seconds = {lease_seconds}
[discord]
guild_ids = [{guild_id}]
progress_interval = {progress_interval}
""")
    return path


class BotProcess:
    """``python tests/bot_process.py`` as a child process of the test: start, kill -9, restart.

    Its output goes to ``log_path`` (appended across restarts) so a failing test can show it.
    """

    def __init__(self, emulator, config: Path, log_path: Path, *, no_engine: bool = False) -> None:
        self.emulator = emulator
        self.args = [sys.executable, str(Path(__file__).resolve()), "--config", str(config)]
        if no_engine:
            self.args.append("--no-engine")
        self.log_path = log_path
        self.child: Logged | None = None
        self.starts = 0

    @property
    def process(self) -> subprocess.Popen | None:
        return None if self.child is None else self.child.process

    async def start(self, timeout: float = START_BUDGET) -> None:
        """Start the bot and wait until the emulator has seen it identify on the gateway."""
        assert self.process is None or self.process.poll() is not None, "the bot is running already"
        self.starts += 1
        self.child = start_logged(
            f"bot (start {self.starts})",
            self.args,
            self.log_path,
            cwd=ROOT,
            env={
                "EMULATOR_URL": self.emulator.base_url,
                "DISCORD_TOKEN": self.emulator.token,
                "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
            },
        )
        await until(
            lambda: self.emulator.connected,
            "the bot to connect to the emulator's gateway",
            budget=timeout,
            watched=[self.child],
        )

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs; wait until the emulator has seen it go."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await until(
            lambda: self.process.poll() is not None and not self.emulator.connected,
            "the killed bot's gateway connection to close",
        )

    async def stop(self) -> int | None:
        """SIGTERM (what an operator does), then the exit status; kill -9 if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            await until(lambda: self.process.poll() is not None, "the bot to exit", budget=EXIT_BUDGET)
        except AssertionError:
            self.child.kill()
            return None
        return self.process.returncode

    @property
    def watched(self) -> list[Logged]:
        """The bot, for ``until(..., watched=bot.watched)``: a wait fails at once if it exits."""
        return [] if self.child is None else [self.child]

    def log(self) -> str:
        return self.child.tail() if self.child else ""


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
