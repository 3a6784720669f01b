"""A write-ahead journal of the interactions the bot acknowledges: an append-only file beside the
database, so that an acknowledgement never waits on the database and never outlives its job.

Why a file and not a table: Discord gives a command 3 seconds, and the database may take much
longer (another process holds SQLite's write lock for a ``VACUUM`` or a ``.backup``; PostgreSQL
restarts). A line appended to a local file and ``fsync``'d takes milliseconds whatever the
database does. The bot journals a command (its interaction's token and the request: the job's
kind and typed :class:`~engine.params.GenerationParams`) before it acknowledges it, and closes
the entry once the job is stored or the member has been answered. Whatever is still open when
the bot starts again (a kill -9, a power cut) is replayed by :mod:`bot.acks`: each entry is
queued from its journaled request or answered while its token is valid (15 minutes).

Format: one JSON object per line, ``{"op": "ack", ...}`` to open an entry, ``{"op": "done",
"id": ...}`` to close it. A torn last line (a crash in the middle of a write) is skipped.
Appends are written by one thread in groups, one ``fsync`` per group (a group commit, as the
database's writes are). Closing an entry needs no ``fsync`` when its job is stored (a replay
finds the job and drops the entry) and gets one when the member was answered without a job
(a replay must not queue what the member was told was not queued). When no entry is open the
file is truncated; when it has grown past :data:`COMPACT_BYTES` it is rewritten with the open
entries only (write, ``fsync``, rename).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from bot.grouped import GroupedThread
from db.models import JobKind
from db.session import normalize_url
from db.settings import QueueSettings
from engine.control_units import ControlUnit, units_from_column, units_to_column
from engine.params import GenerationParams

log = logging.getLogger(__name__)

#: Past this many bytes written since the last compaction, the file is rewritten with the open entries.
COMPACT_BYTES = 4 * 1024 * 1024
#: Where the journal goes beside a PostgreSQL database (relative to the working directory).
DEFAULT_PATH = "data/sdbot.interactions"
_PARAM_NAMES = tuple(f.name for f in fields(GenerationParams))


@dataclass(frozen=True)
class Request:
    """What a journaled command asked for: enough to queue its job without the interaction."""

    kind: JobKind
    params: GenerationParams
    parent_id: int | None
    requester_id: int
    guild_id: int | None
    channel_id: int | None


@dataclass(frozen=True)
class Entry:
    """One interaction the bot acknowledged, or is about to: its token, and its request (None:
    acknowledged while its checks still ran, so there is nothing to queue, only to answer)."""

    interaction_id: int
    app_id: int
    token: str
    expires_at: datetime
    request: Request | None = None


def journal_path(settings: QueueSettings) -> Path:
    """``queue.journal_path``; else beside a SQLite file (``<file>.interactions``), else
    :data:`DEFAULT_PATH`."""
    if settings.journal_path:
        return Path(settings.journal_path)
    url = normalize_url(settings.database_url)
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database and database != ":memory:" and not database.startswith("file:"):
        return Path(database).with_name(Path(database).name + ".interactions")
    return Path(DEFAULT_PATH)


class InteractionJournal:
    """The journal file; :meth:`load` once at start, then :meth:`append` and :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open: dict[int, Entry] = {}
        self._lock = threading.Lock()  # guards _open: the writing thread reads it
        self._written = 0  # bytes since the last compaction
        self._file: Any = None
        self._writer = GroupedThread("sdbot-journal", self._append_group)  # one write (and fsync) a group

    def load(self) -> list[Entry]:
        """The entries a previous run left open (compacted into a fresh file); call it first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        left: dict[int, Entry] = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_bytes().splitlines(), 1):
                try:
                    record = json.loads(line)
                    if record["op"] == "ack":
                        entry = _decode(record)
                        left[entry.interaction_id] = entry
                    else:
                        left.pop(int(record["id"]), None)
                except (ValueError, KeyError, TypeError) as error:  # a torn line: the crash came mid-write
                    log.warning("%s line %d skipped: %s", self.path, number, error)
        self._open = dict(left)
        self._rewrite()
        return list(left.values())

    @property
    def open_entries(self) -> int:
        return len(self._open)

    async def append(self, entry: Entry) -> None:
        """Journal ``entry`` (replacing one of the same interaction); returns once it is on disk."""
        with self._lock:
            self._open[entry.interaction_id] = entry
        await self._write(_encode(entry), durable=True)

    async def close(self, interaction_id: int, *, answered: bool = False) -> None:
        """The interaction has its job (``answered``: or its answer, without a job: on disk before
        this returns, so that a replay cannot queue it)."""
        with self._lock:
            if self._open.pop(interaction_id, None) is None:
                return
        await self._write(json.dumps({"op": "done", "id": interaction_id}).encode() + b"\n", durable=answered)

    async def _write(self, line: bytes, *, durable: bool) -> None:
        await self._writer.submit((line, durable))

    def _append_group(self, group: list[tuple[bytes, bool]]) -> Iterator[tuple[int, None]]:
        self._append(b"".join(line for line, _ in group), any(durable for _, durable in group))
        return iter(())  # every waiter is told together, once the group is written

    def _append(self, data: bytes, durable: bool) -> None:
        if self._file is None:
            self._file = self.path.open("ab")
        self._file.write(data)
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())
        self._written += len(data)
        with self._lock:
            empty = not self._open
        if empty:  # nothing open: start the file again (no fsync: a stale entry is checked on replay)
            self._file.truncate(0)
            self._written = 0
        elif self._written > COMPACT_BYTES:
            self._rewrite()

    def _rewrite(self) -> None:
        """The file again, holding the open entries only: written beside it, synced, renamed."""
        with self._lock:
            entries = list(self._open.values())
        if self._file is not None:
            self._file.close()
            self._file = None
        temporary = self.path.with_name(self.path.name + ".new")
        with temporary.open("wb") as out:
            out.write(b"".join(_encode(entry) for entry in entries))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power cut
        finally:
            os.close(folder)
        self._written = 0

    def shutdown(self) -> None:
        self._writer.shutdown(wait=True)
        if self._file is not None:
            self._file.close()
            self._file = None


def _encode(entry: Entry) -> bytes:
    record: dict[str, Any] = {
        "op": "ack",
        "id": entry.interaction_id,
        "app_id": entry.app_id,
        "token": entry.token,
        "expires_at": entry.expires_at.isoformat(),
    }
    if entry.request is not None:
        request = entry.request
        record["request"] = {
            "kind": request.kind.value,
            "parent_id": request.parent_id,
            "requester_id": request.requester_id,
            "guild_id": request.guild_id,
            "channel_id": request.channel_id,
            "params": {name: _plain(getattr(request.params, name)) for name in _PARAM_NAMES},
        }
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _decode(record: dict[str, Any]) -> Entry:
    request = None
    if record.get("request") is not None:
        raw = record["request"]
        # Parameters a later version dropped are left out; ones it added take their defaults.
        params = GenerationParams(**{k: _typed(v) for k, v in raw["params"].items() if k in _PARAM_NAMES})
        request = Request(
            kind=JobKind(raw["kind"]),
            params=params,
            parent_id=raw["parent_id"],
            requester_id=raw["requester_id"],
            guild_id=raw["guild_id"],
            channel_id=raw["channel_id"],
        )
    return Entry(
        interaction_id=int(record["id"]),
        app_id=int(record["app_id"]),
        token=record["token"],
        expires_at=datetime.fromisoformat(record["expires_at"]),
        request=request,
    )


def _plain(value: Any) -> Any:
    """A parameter as JSON: bytes (an init image, a mask) as base64; ControlNet units as their column."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, tuple) and all(isinstance(unit, ControlUnit) for unit in value):
        return {"control_units": units_to_column(value)}
    return value


def _typed(value: Any) -> Any:
    if isinstance(value, dict) and "control_units" in value:
        return units_from_column(value["control_units"])
    return base64.b64decode(value["base64"]) if isinstance(value, dict) else value
