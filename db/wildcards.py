"""Servers' wildcard lists (Dynamic Prompts' ``__name__``): named lists of prompt pieces, one per
line, that a prompt draws from. Managers add, import, remove and list them; every change is
written to the audit log. A list is read whole for each prompt that names it, so its size is bounded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import AuditEntry, Wildcard
from db.session import session_makers

#: A list's largest file, its most lines and longest line (Dynamic Prompts' shared lists of
#: artists or colours are a few hundred lines; a prompt draws a line of one per image).
MAX_WILDCARD_BYTES = 128 * 1024
MAX_WILDCARD_LINES = 5000
MAX_LINE_CHARS = 500
#: Most lists one server may keep.
MAX_WILDCARDS = 200
#: A list's name, as a LoRA's is checked: letters, digits, ``_`` and ``-``, no folders.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


class WildcardError(ValueError):
    """A wildcard list a manager gave cannot be stored; the message says why."""


def check_name(name: str) -> str:
    name = name.strip()
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        name = name[2:-2]  # written as it is used: __colours__
    if not NAME.fullmatch(name):
        raise WildcardError(
            f"`{name[:40]}` cannot name a wildcard list: use letters, digits, `_` and `-` (64 at most, "
            "no folders), e.g. `colours`; prompts then draw from it with `__colours__`."
        )
    return name


def parse_lines(data: bytes | str) -> list[str]:
    """A list's entries from a text file: one per line; blank lines and ``#`` comments left out
    (as Dynamic Prompts reads its files). WildcardError for a file too big or not text."""
    if len(data) > MAX_WILDCARD_BYTES:
        raise WildcardError(f"A wildcard list may be {MAX_WILDCARD_BYTES // 1024} KiB at most; split it into several.")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise WildcardError("A wildcard list must be UTF-8 text, one entry per line.") from None
    lines = [line.strip() for line in data.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise WildcardError("The list has no entries: write one per line.")
    if len(lines) > MAX_WILDCARD_LINES:
        raise WildcardError(f"A wildcard list may have {MAX_WILDCARD_LINES} entries at most (this has {len(lines)}).")
    long = next((line for line in lines if len(line) > MAX_LINE_CHARS), None)
    if long is not None:
        raise WildcardError(f"An entry may be {MAX_LINE_CHARS} characters at most: `{long[:40]}…` is longer.")
    return lines


class Wildcards:
    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] | None = None) -> None:
        self._write, self._read = session_makers(engine)  # reads do not wait for SQLite's write turn
        self.clock = clock or (lambda: datetime.now(UTC))

    def names(self, guild_id: int) -> list[str]:
        with self._read() as session:
            query = select(Wildcard.name).where(Wildcard.guild_id == guild_id).order_by(Wildcard.name)
            return list(session.scalars(query))

    def sizes(self, guild_id: int) -> list[tuple[str, int]]:
        """Each list's name and number of entries."""
        with self._read() as session:
            rows = session.scalars(select(Wildcard).where(Wildcard.guild_id == guild_id).order_by(Wildcard.name))
            return [(row.name, row.lines.count("\n") + 1) for row in rows]

    def lines(self, guild_id: int, names: Iterable[str]) -> dict[str, list[str]]:
        """The named lists that exist, with their entries (one statement)."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        with self._read() as session:
            rows = session.execute(
                select(Wildcard.name, Wildcard.lines).where(Wildcard.guild_id == guild_id, Wildcard.name.in_(wanted))
            )
            return {name: text.split("\n") for name, text in rows}

    def put(self, guild_id: int, actor_id: int, name: str, lines: list[str]) -> int:
        """Add or replace the list ``name``; returns how many lists the server has now."""
        name = check_name(name)
        with self._write.begin() as session:
            old = session.get(Wildcard, (guild_id, name))
            before = None if old is None else f"{old.lines.count(chr(10)) + 1} entries"
            session.merge(Wildcard(guild_id=guild_id, name=name, lines="\n".join(lines)))
            self._log(session, guild_id, actor_id, f"wildcard {name}", before, f"{len(lines)} entries")
            session.flush()
            count = session.scalar(select(func.count()).select_from(Wildcard).where(Wildcard.guild_id == guild_id))
            if (count or 0) > MAX_WILDCARDS:
                raise WildcardError(f"A server can keep up to {MAX_WILDCARDS} wildcard lists; remove some first.")
            return count or 0

    def remove(self, guild_id: int, actor_id: int, name: str) -> bool:
        with self._write.begin() as session:
            old = session.get(Wildcard, (guild_id, name.strip()))
            if old is None:
                return False
            session.delete(old)
            self._log(
                session, guild_id, actor_id, f"wildcard {old.name}", f"{old.lines.count(chr(10)) + 1} entries", None
            )
            return True

    def _log(
        self, session: Session, guild_id: int, actor_id: int, action: str, old: str | None, new: str | None
    ) -> None:
        entry = AuditEntry(guild_id=guild_id, actor_id=actor_id, created_at=self.clock(), action=action)
        entry.old_value, entry.new_value = old, new
        session.add(entry)
