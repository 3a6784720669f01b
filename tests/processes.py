"""Child processes of the tests (the bot, GPU workers), waited on the way a loaded machine needs.

A test that starts a process waits for a real signal that it is ready (the emulator seeing the
gateway IDENTIFY, a line in the process's log, a job it claimed in the database), never for a
fixed time. The budgets are minutes: on the two cores of a shared machine a cold start (import
torch, load the tiny model) took 34-95 s, against a few seconds on a quiet one, and a budget
only costs time when something is wrong. Then the failure shows the tail of each process's log.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

START_BUDGET = 300.0  # s until a started process is ready (connected, serving)
BUDGET = 300.0  # s for anything else a test waits on: a job to run, every job to be posted
EXIT_BUDGET = 120.0  # s for a process to exit after SIGTERM (it gives its running jobs back first)
POLL = 0.05


@dataclass
class Logged:
    """A child process whose stdout and stderr go to ``log_path`` (appended across restarts)."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def tail(self, chars: int = 8000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def check_running(self) -> None:
        """Fail at once, with its log, when the process has exited while a test waits on it."""
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def exit_status(self, budget: float = EXIT_BUDGET) -> int:
        try:
            return self.process.wait(budget)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {budget} s:\n{self.tail()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_logged(
    name: str, args: Sequence[str], log_path: Path, *, cwd: Path, env: dict[str, str] | None = None
) -> Logged:
    """Start ``args`` with its output appended to ``log_path`` after a line saying which start it is."""
    with log_path.open("a") as log:
        log.write(f"\n===== {name}: {' '.join(map(str, args))} =====\n")
        log.flush()
        process = subprocess.Popen(
            list(args), cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )
    return Logged(name, process, log_path)


def _timed_out(what: str, budget: float, watched: Sequence[Logged]) -> AssertionError:
    logs = "".join(f"\n--- {child.name} (log tail) ---\n{child.tail()}" for child in watched)
    return AssertionError(f"timed out after {budget} s waiting for {what}{logs}")


def wait_for(condition: Callable[[], T], what: str, *, budget: float = BUDGET, watched: Sequence[Logged] = ()) -> T:
    """Poll ``condition`` until it returns something truthy; fail early if a watched process exits."""
    deadline = time.monotonic() + budget
    while not (result := condition()):
        for child in watched:
            child.check_running()
        if time.monotonic() > deadline:
            raise _timed_out(what, budget, watched)
        time.sleep(POLL)
    return result


async def until(condition: Callable[[], T], what: str, *, budget: float = BUDGET, watched: Sequence[Logged] = ()) -> T:
    """``wait_for`` for a test whose event loop also runs the Discord emulator."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    while not (result := condition()):
        for child in watched:
            child.check_running()
        if loop.time() > deadline:
            raise _timed_out(what, budget, watched)
        await asyncio.sleep(POLL)
    return result


class WriteLock:
    """Another process holding SQLite's write lock (as a ``.backup``, a ``VACUUM`` or a second
    tool does) until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        code = (
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\nsys.stdin.readline()\nc.execute('COMMIT')\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "locked"
        self.since = time.monotonic()

    async def release(self, after: float) -> None:
        """Release once the lock has been held ``after`` seconds (the scenario's length)."""
        await asyncio.sleep(max(0.0, self.since + after - time.monotonic()))
        self.process.communicate("\n", timeout=60)
