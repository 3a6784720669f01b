"""Servers' styles (named prompt templates, as AUTOMATIC1111's styles.csv) and members' default
style per server. Every change by a manager is written to the audit log."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, bindparam, delete, func, select
from sqlalchemy.orm import Session

from db.models import AuditEntry, MemberStyle, Style
from db.session import session_makers

#: Most styles one server may keep (what autocomplete can sensibly offer is 25 at a time).
MAX_STYLES = 500
MAX_NAME = 100


class StyleError(ValueError):
    """A style a manager gave cannot be stored; the message says why."""


@dataclass(frozen=True)
class StyleText:
    name: str
    prompt: str
    negative_prompt: str

    def apply(self, prompt: str, negative: str) -> tuple[str, str]:
        """AUTOMATIC1111's rule: ``{prompt}`` in the style is replaced by the member's text;
        without it, the style is appended after a comma."""
        return _merge(self.prompt, prompt), _merge(self.negative_prompt, negative)


def _merge(style: str, text: str) -> str:
    if not style:
        return text
    if "{prompt}" in style:
        return style.replace("{prompt}", text)
    return f"{text}, {style}" if text else style


def parse_styles_csv(data: bytes) -> list[StyleText]:
    """The styles of an AUTOMATIC1111 ``styles.csv`` (columns name, prompt, negative_prompt)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise StyleError("styles.csv must be UTF-8 text.") from None
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "name" not in reader.fieldnames or "prompt" not in reader.fieldnames:
        raise StyleError("styles.csv needs the columns name, prompt and negative_prompt (as AUTOMATIC1111 writes).")
    styles = []
    for row in reader:
        name = (row.get("name") or "").strip()
        if not name:
            continue
        if len(name) > MAX_NAME:
            raise StyleError(f"The style name {name[:40]!r}… is longer than {MAX_NAME} characters.")
        styles.append(StyleText(name, (row.get("prompt") or "").strip(), (row.get("negative_prompt") or "").strip()))
    if not styles:
        raise StyleError("styles.csv holds no styles.")
    return styles


_STYLE_TEXT = (Style.name, Style.prompt, Style.negative_prompt)
_NAMED = select(*_STYLE_TEXT).where(Style.guild_id == bindparam("guild_id"), Style.name == bindparam("name"))
_MEMBER_DEFAULT = (
    select(*_STYLE_TEXT)
    .join(MemberStyle, (MemberStyle.guild_id == Style.guild_id) & (MemberStyle.style == Style.name))
    .where(MemberStyle.guild_id == bindparam("guild_id"), MemberStyle.user_id == bindparam("user_id"))
)


class Styles:
    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] | None = None) -> None:
        self._write, self._read = session_makers(engine)  # reads do not wait for SQLite's write turn
        self.clock = clock or (lambda: datetime.now(UTC))

    def _log(
        self, session: Session, guild_id: int, actor_id: int, action: str, old: str | None, new: str | None
    ) -> None:
        session.add(
            AuditEntry(
                guild_id=guild_id,
                actor_id=actor_id,
                created_at=self.clock(),
                action=action,
                old_value=old,
                new_value=new,
            )
        )

    def names(self, guild_id: int) -> list[str]:
        with self._read() as session:
            return list(session.scalars(select(Style.name).where(Style.guild_id == guild_id).order_by(Style.name)))

    def get(self, guild_id: int, name: str) -> StyleText | None:
        with self._read() as session:
            row = session.get(Style, (guild_id, name))
            return None if row is None else StyleText(row.name, row.prompt, row.negative_prompt)

    def all(self, guild_id: int) -> list[StyleText]:
        with self._read() as session:
            rows = session.scalars(select(Style).where(Style.guild_id == guild_id).order_by(Style.name))
            return [StyleText(r.name, r.prompt, r.negative_prompt) for r in rows]

    def put(self, guild_id: int, actor_id: int, styles: list[StyleText]) -> int:
        """Add or replace ``styles``; returns how many the server has now."""
        with self._write.begin() as session:
            for style in styles:
                old = session.get(Style, (guild_id, style.name))
                before = None if old is None else f"{old.prompt} | {old.negative_prompt}"
                session.merge(
                    Style(
                        guild_id=guild_id, name=style.name, prompt=style.prompt, negative_prompt=style.negative_prompt
                    )
                )
                self._log(
                    session,
                    guild_id,
                    actor_id,
                    f"style {style.name}",
                    before,
                    f"{style.prompt} | {style.negative_prompt}",
                )
            session.flush()
            count = session.scalar(select(func.count()).select_from(Style).where(Style.guild_id == guild_id)) or 0
            if count > MAX_STYLES:
                raise StyleError(f"A server can keep up to {MAX_STYLES} styles; remove some first.")
            return count

    def remove(self, guild_id: int, actor_id: int, name: str) -> bool:
        with self._write.begin() as session:
            old = session.get(Style, (guild_id, name))
            if old is None:
                return False
            session.delete(old)
            session.execute(delete(MemberStyle).where(MemberStyle.guild_id == guild_id, MemberStyle.style == name))
            self._log(session, guild_id, actor_id, f"style {name}", f"{old.prompt} | {old.negative_prompt}", None)
            return True

    def chosen(self, guild_id: int, user_id: int, name: str | None) -> StyleText | None:
        """The style called ``name``, or with ``name`` None the member's default style here;
        None when there is no such style. One statement: the bot asks for every command."""
        with self._read() as session:
            if name is not None:
                row = session.execute(_NAMED, {"guild_id": guild_id, "name": name}).first()
            else:
                row = session.execute(_MEMBER_DEFAULT, {"guild_id": guild_id, "user_id": user_id}).first()
            return None if row is None else StyleText(*row)

    def member_default(self, guild_id: int, user_id: int) -> str | None:
        with self._read() as session:
            row = session.get(MemberStyle, (guild_id, user_id))
            return None if row is None else row.style

    def set_member_default(self, guild_id: int, user_id: int, name: str | None) -> None:
        with self._write.begin() as session:
            row = session.get(MemberStyle, (guild_id, user_id))
            if name is None:
                if row is not None:
                    session.delete(row)
            else:
                session.merge(MemberStyle(guild_id=guild_id, user_id=user_id, style=name))
