"""The engine worker's end of the link to the bot that started it (``--bot-link FD``).

By default ``python -m bot`` runs its engine as a child process, ``python -m engine worker``
(measured in BENCHMARKS.md, issue 11 §7: the engine's Python then no longer shares the GIL with
the bot's event loop). The child claims and stores jobs through the database like any worker;
the link carries only what makes it as quick and as visible as an engine in the bot's process:

- child to bot, JSON lines on the file descriptor ``FD``: ``{"ready": family}`` once the default
  model is loaded (the bot offers that family's sizes), ``{"progress": [job, step, total],
  "preview": base64 PNG or null}``, ``{"finished": job}`` (the bot posts it at once and counts it
  in its metrics) and ``{"rows": n, "gpu": {device: [allocated, reserved]}, "graphs": {"unet":
  [made, eager], "sampler": [made, eager], "lora": [slot loads, jobs run whole]} or null}`` every second;
- bot to child, lines on standard input: ``wake`` (a job was queued: claim now, not at the next
  poll) and ``cancel JOB`` (stop a running job at its next step). End of input means the bot is
  gone, even after kill -9: the child stops as on SIGTERM, giving its running jobs back (or at
  once, while it is still loading its model).

Progress and stats are dropped when the bot falls behind (the next ones replace them); ready and
finished are not. Nothing here is needed for correctness: a lost line costs a poll interval.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from engine.types import Progress
from ops import gpu_memory

log = logging.getLogger(__name__)

#: Seconds between two stats lines (batch rows and GPU memory, for the bot's /metrics).
STATS_INTERVAL = 1.0
#: Lines waiting for the bot to read them, past which progress and stats are dropped.
BACKLOG = 256


class BotLink:
    def __init__(self, report_fd: int) -> None:
        """Made first thing in the process: the bot is watched from the start, so a bot killed
        while this process still loads its model leaves it no time to claim anything."""
        self._out = os.fdopen(report_fd, "w", encoding="utf-8", buffering=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._commands: tuple[asyncio.AbstractEventLoop, Callable[[], None], Callable[[int], None]] | None = None
        threading.Thread(target=self._write_all, name="bot-link-out", daemon=True).start()
        threading.Thread(target=self._read_all, name="bot-link-in", daemon=True).start()

    # -- child to bot (from any thread) ---------------------------------------------------------

    def ready(self, family: str) -> None:
        self._send({"ready": family}, droppable=False)

    def progress(self, job_id: int, progress: Progress) -> None:
        preview = base64.b64encode(progress.preview).decode() if progress.preview else None
        self._send({"progress": [job_id, progress.step, progress.total], "preview": preview})

    def finished(self, job_id: int) -> None:
        self._send({"finished": job_id}, droppable=False)

    def stats(
        self, rows: int, gpu: dict[str, tuple[int, int]], graphs: dict[str, tuple[int, int]] | None = None
    ) -> None:
        self._send({"rows": rows, "gpu": gpu, "graphs": graphs})

    def _send(self, message: dict[str, Any], *, droppable: bool = True) -> None:
        if droppable and self._lines.qsize() >= BACKLOG:
            return
        self._lines.put(json.dumps(message))

    def _write_all(self) -> None:
        while (line := self._lines.get()) is not None:
            try:
                self._out.write(line + "\n")
            except OSError:  # the bot is gone (a broken pipe); standard input's end says so too
                return

    # -- bot to child ---------------------------------------------------------------------------

    def listen(
        self, loop: asyncio.AbstractEventLoop, *, wake: Callable[[], None], cancel: Callable[[int], None]
    ) -> None:
        """From now on the bot's ``wake`` and ``cancel`` lines are acted on in ``loop``."""
        self._commands = (loop, wake, cancel)

    def _read_all(self) -> None:
        for raw in sys.stdin:
            command, _, argument = raw.strip().partition(" ")
            if self._commands is None:  # still starting: nothing runs yet that they could be about
                continue
            loop, wake, cancel = self._commands
            with contextlib.suppress(RuntimeError):  # the loop has ended: this process is stopping
                if command == "wake":
                    loop.call_soon_threadsafe(wake)
                elif command == "cancel" and argument.isdigit():
                    loop.call_soon_threadsafe(cancel, int(argument))
        log.info("the bot that started this worker is gone: stopping")
        # As an operator's SIGTERM: while starting, the default action ends the process at once;
        # once serving, the worker's handler stops it and gives its running jobs back.
        os.kill(os.getpid(), signal.SIGTERM)

    async def send_stats(
        self, rows: Callable[[], int], graphs: Callable[[], dict[str, tuple[int, int]] | None]
    ) -> None:
        """Every :data:`STATS_INTERVAL`: the running batch's rows, this process's GPU memory and the
        compiled step's graph counts."""
        while True:
            self.stats(rows(), gpu_memory(), graphs())
            await asyncio.sleep(STATS_INTERVAL)

    def close(self) -> None:
        self._lines.put(None)
