"""The bot's engine in a child process: ``python -m engine worker --bot-link FD``, started,
watched and stopped by the bot (``engine.process = "worker"``, the default).

A child process rather than a thread of the bot, because it is faster: the engine's Python (the
step loop, admissions, finishing) no longer shares the GIL with the event loop that answers
Discord. Measured with ``bench/load.py`` in BENCHMARKS.md (issue 11 §7). The child is a worker
like any other (it claims and stores jobs through the database); to the bot it stands where the
in-process :class:`~engine.serving.runner.QueueRunner` would: :meth:`run` is the bot's supervised
"queue-runner" task, :meth:`wake` and :meth:`cancel` reach the child over its standard input,
and progress, finished jobs, batch rows and GPU memory come back over the link
(:mod:`engine.serving.bot_link` has the protocol).

How it ends:

- it exits before its default model is loaded, at start: :meth:`start` raises
  :class:`EngineStartError` and the bot stops with one line (the child has printed the cause);
- it exits later (a crash, kill -9, out of memory): :meth:`run` raises, and the bot's task
  supervision starts it again after a pause, or stops the bot non-zero if it keeps failing;
- the bot stops: SIGTERM, then up to :data:`STOP_BUDGET` seconds while the child gives its
  running jobs back, then SIGKILL;
- the bot is killed: the child's standard input closes and it stops on its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.types import Progress

log = logging.getLogger(__name__)

#: Seconds the child has to give its running jobs back when the bot stops, before SIGKILL.
STOP_BUDGET = 30.0
#: The child's worker name (its jobs left running by a previous run are recovered by that name).
WORKER_NAME = "bot-engine"
#: Longest report line (a progress preview travels as base64 in one line).
LINE_LIMIT = 16 * 1024 * 1024


class EngineStartError(Exception):
    """The engine process exited before its model was loaded."""

    def __init__(self, status: int) -> None:
        super().__init__(
            f"the engine process (python -m engine worker) exited with status {status} before its model "
            "was loaded; its message is above"
        )
        self.status = status


class EngineProcess:
    def __init__(
        self,
        config_path: Path,
        *,
        name: str = WORKER_NAME,
        stopping: Callable[[], bool] = bool,
        command: Sequence[str] | None = None,
    ) -> None:
        """``stopping()``: whether the bot is stopping (a child that exits then is not started again:
        a service manager's SIGTERM reaches both processes at once). ``command``: what to run
        instead of ``python -m engine worker`` (tests); ``--bot-link FD`` is added to it."""
        self._args = list(command or [sys.executable, "-m", "engine", "worker", "--config", str(config_path)])
        if command is None:
            self._args += ["--name", name]
        self._stopping = stopping
        self._process: asyncio.subprocess.Process | None = None
        self._reports: asyncio.StreamReader | None = None
        self.on_progress: Callable[[int, Progress], None] | None = None
        self.on_finished: Callable[[int], None] | None = None
        self.batch_rows = 0
        self.gpu_memory: dict[str, tuple[int, int]] = {}
        #: {"unet": (made, run eager), "sampler": (made, run eager)}; None: not compiled
        self.graphs: dict[str, tuple[int, int]] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> str:
        """Start the child and wait until its default model is loaded; that model's family."""
        read_fd, write_fd = os.pipe()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._args,
                "--bot-link",
                str(write_fd),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                env={k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"},  # the child never needs it
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        self._reports = reader
        log.info("engine process %s started; loading its model", self._process.pid)
        while line := await reader.readline():
            message = _decoded(line)
            if "ready" in message:
                log.info("engine process %s is ready (%s)", self._process.pid, message["ready"])
                return message["ready"]
            self._take(message)
        raise EngineStartError(await self._process.wait())

    async def run(self) -> None:
        """Relay the child's reports until it exits (then raise: the bot starts it again)."""
        try:
            if self._process is None or self._process.returncode is not None:
                await self.start()
            assert self._reports is not None and self._process is not None
            while line := await self._reports.readline():
                self._take(_decoded(line))
            status = await self._process.wait()
            if self._stopping():
                await asyncio.Event().wait()  # until the bot's closing cancels this task
        except asyncio.CancelledError:
            await self.stop()
            raise
        raise RuntimeError(f"the engine process exited with status {status}")

    def wake(self) -> None:
        """A job was queued or may start now: the child claims at once, not at its next poll."""
        self._tell("wake")

    def cancel(self, job_id: int) -> None:
        """Stop a running job at its next step (the queue has already marked it cancelled)."""
        self._tell(f"cancel {job_id}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_BUDGET` seconds; returns once it has exited."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_BUDGET)
        except TimeoutError:
            log.warning("engine process %s did not stop in %.0f s; killing it", process.pid, STOP_BUDGET)
            process.kill()
            await process.wait()

    def _tell(self, line: str) -> None:
        process = self._process
        if process is None or process.returncode is not None or process.stdin is None or process.stdin.is_closing():
            return
        try:
            process.stdin.write(line.encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError, RuntimeError):  # it is exiting; run() will see
            pass

    def _take(self, message: dict[str, Any]) -> None:
        if "progress" in message:
            job_id, step, total = message["progress"]
            preview = base64.b64decode(message["preview"]) if message.get("preview") else None
            if self.on_progress is not None:
                self.on_progress(job_id, Progress(job_id, step, total, preview))
        elif "finished" in message:
            if self.on_finished is not None:
                self.on_finished(message["finished"])
        elif "rows" in message:
            self.batch_rows = message["rows"]
            self.gpu_memory = {device: (held, kept) for device, (held, kept) in message["gpu"].items()}
            graphs = message.get("graphs")
            self.graphs = {part: tuple(counts) for part, counts in graphs.items()} if graphs else None


def _decoded(line: bytes) -> dict[str, Any]:
    """One report; a line cut short (the child killed while writing it) is skipped, with a warning."""
    try:
        message = json.loads(line)
    except ValueError:
        log.warning("engine process: a report that is not JSON was skipped: %r", line[:200])
        return {}
    return message if isinstance(message, dict) else {}
