"""Community settings: members' defaults, each server's policy, moderation, the audit log, stats.

A member's defaults (:class:`MemberDefaults`) fill the options a command leaves out; a server's
policy (:class:`ServerPolicy`) narrows what the configuration allows there. Both come back as
frozen values with the bot's defaults (None / empty) where nothing was set, so callers never
see a missing row. Every change a server manager makes is one transaction that also writes an
:class:`~db.models.AuditEntry` per changed value (who, when, what, old -> new).

Values are checked at the Discord boundary (``bot.community``); this module trusts them. Like
:class:`db.queue.Queue`, every method runs its own short transaction, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, bindparam, delete, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.clock import utcnow
from db.community_values import (
    DAY,
    Admission,
    MemberDefaults,
    ServerPolicy,
    ServerStats,
    Usage,
    day_start,
    week_start,
)
from db.models import (
    PENDING,
    AuditEntry,
    BarredMember,
    Job,
    JobStatus,
    MemberSettings,
    ResultReport,
    ServerSettings,
)
from db.session import session_makers

__all__ = [
    "DAY",
    "Admission",
    "Community",
    "MemberDefaults",
    "ServerPolicy",
    "ServerStats",
    "Usage",
    "day_start",
    "week_start",
]

_NO_UPDATE_SYNC = {"synchronize_session": False}
MEMBER_FIELDS = frozenset(f.name for f in fields(MemberDefaults))
SERVER_FIELDS = frozenset(f.name for f in fields(ServerPolicy))
_LIST_FIELDS = frozenset({"allowed_channel_ids", "nsfw_words", "safety_labels", "reference_modes_off"})
_SERVER_ROW_DEFAULTS = {
    "allowed_channel_ids": [],
    "nsfw_words": [],
    "cooldown_seconds": 0,
    "paused": False,
    "safety_labels": [],
    "reveal_in_dm": False,
    "reference_modes_off": [],
}


def _admission_statement() -> Any:
    """Every per-command fact of :meth:`Community.admission` as one row: LEFT JOINs from a
    one-row select, so a member or server without settings still gives a row."""
    one = select(literal(1).label("one")).subquery()
    member, server = MemberSettings.__table__, ServerSettings.__table__
    barred = (
        select(BarredMember.user_id)
        .where(BarredMember.guild_id == bindparam("guild_id"), BarredMember.user_id == bindparam("user_id"))
        .exists()
    )
    pending = (
        select(func.count())
        .select_from(Job)
        .where(Job.requester_id == bindparam("user_id"), Job.status.in_(PENDING))
        .scalar_subquery()
    )
    return (
        select(
            member.c.user_id.label("member_found"),
            *(member.c[name].label(f"member_{name}") for name in sorted(MEMBER_FIELDS)),
            server.c.guild_id.label("server_found"),
            *(server.c[name].label(f"server_{name}") for name in sorted(SERVER_FIELDS)),
            barred.label("barred"),
            pending.label("pending"),
        )
        .select_from(one)
        .outerjoin(member, member.c.user_id == bindparam("user_id"))
        .outerjoin(server, server.c.guild_id == bindparam("guild_id"))
    )


_ADMISSION = _admission_statement()


def _show(value: Any) -> str | None:
    """An audit log value as text."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


class Community:
    """Member settings, server policy, moderation and stats over one database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        self._write, self._read = session_makers(engine)

    def _insert_missing(self, session: Session, model: type, key: dict[str, int], defaults: dict[str, Any]) -> None:
        """Create the row with ``defaults`` unless it exists (safe against a concurrent insert)."""
        insert = pg_insert if self._postgres else sqlite_insert
        session.execute(
            insert(model)
            .values(**key, **defaults, updated_at=self.clock())
            .on_conflict_do_nothing(index_elements=list(key))
        )

    # -- members ------------------------------------------------------------------------------

    def member_defaults(self, user_id: int) -> MemberDefaults:
        with self._read.begin() as session:
            return self._member_defaults(session, user_id)

    @staticmethod
    def _member_defaults(session: Session, user_id: int) -> MemberDefaults:
        row = session.get(MemberSettings, user_id)
        if row is None:
            return MemberDefaults()
        return MemberDefaults(**{name: getattr(row, name) for name in MEMBER_FIELDS})

    def set_member_defaults(self, user_id: int, **changes: Any) -> MemberDefaults:
        """Change some of a member's defaults (None clears one); the others stay."""
        unknown = set(changes) - MEMBER_FIELDS
        if unknown:
            raise TypeError(f"not member settings: {sorted(unknown)}")
        with self._write.begin() as session:
            self._insert_missing(session, MemberSettings, {"user_id": user_id}, {"private_results": False})
            row = session.get(MemberSettings, user_id, with_for_update=True)
            for name, value in changes.items():
                setattr(row, name, value)
            row.private_results = bool(row.private_results)
            row.updated_at = self.clock()
            return MemberDefaults(**{name: getattr(row, name) for name in MEMBER_FIELDS})

    def reset_member_defaults(self, user_id: int) -> None:
        with self._write.begin() as session:
            session.execute(delete(MemberSettings).where(MemberSettings.user_id == user_id))

    # -- servers ------------------------------------------------------------------------------

    def server_policy(self, guild_id: int) -> ServerPolicy:
        with self._read.begin() as session:
            return self._server_policy(session, guild_id)

    def _server_policy(self, session: Session, guild_id: int) -> ServerPolicy:
        row = session.get(ServerSettings, guild_id)
        return ServerPolicy() if row is None else self._policy(row)

    def admission(self, guild_id: int | None, user_id: int, since: datetime) -> Admission:
        """What a new job of ``user_id`` is checked against (``guild_id`` None: a DM, where no
        server policy applies), in one short read: the bot answers within Discord's deadline.

        One statement for the member's defaults, the server's policy, the bar and the pending
        count (the bot runs this for every command, so not one ORM query each); the usage only
        when the server limits it."""
        with self._read.begin() as session:
            row = session.execute(_ADMISSION, {"user_id": user_id, "guild_id": guild_id}).one()
            values = row._mapping
            defaults = MemberDefaults()
            if values["member_found"] is not None:
                defaults = MemberDefaults(**{name: values[f"member_{name}"] for name in MEMBER_FIELDS})
            policy, barred, usage = ServerPolicy(), False, Usage(0, None, None)
            if guild_id is not None:
                if values["server_found"] is not None:
                    policy = self._policy_of({name: values[f"server_{name}"] for name in SERVER_FIELDS})
                barred = bool(values["barred"])
                if policy.daily_limit is not None or policy.cooldown_seconds:
                    usage = self._usage(session, guild_id, user_id, since)
        return Admission(defaults, policy, barred, values["pending"], usage)

    @staticmethod
    def _policy(row: ServerSettings) -> ServerPolicy:
        return Community._policy_of({name: getattr(row, name) for name in SERVER_FIELDS})

    @staticmethod
    def _policy_of(values: dict[str, Any]) -> ServerPolicy:
        for name in _LIST_FIELDS:
            values[name] = tuple(values[name] or ())
        return ServerPolicy(**values)

    def update_server(self, guild_id: int, actor_id: int, **changes: Any) -> ServerPolicy:
        """Change some of a server's settings, logging each value that really changed."""
        unknown = set(changes) - SERVER_FIELDS
        if unknown:
            raise TypeError(f"not server settings: {sorted(unknown)}")
        now = self.clock()
        with self._write.begin() as session:
            key = {"guild_id": guild_id}
            self._insert_missing(session, ServerSettings, key, _SERVER_ROW_DEFAULTS)
            row = session.get(ServerSettings, guild_id, with_for_update=True)
            before = self._policy(row)
            after = replace(before, **{k: tuple(v) if k in _LIST_FIELDS else v for k, v in changes.items()})
            for name in sorted(changes):
                old, new = getattr(before, name), getattr(after, name)
                if old == new:
                    continue
                setattr(row, name, list(new) if name in _LIST_FIELDS else new)
                self._log(session, guild_id, actor_id, name, _show(old), _show(new), now=now)
            row.updated_at = now
            return after

    def bar(self, guild_id: int, user_id: int, actor_id: int) -> bool:
        """Bar a member from the bot on this server; False when already barred."""
        now = self.clock()
        with self._write.begin() as session:
            insert = pg_insert if self._postgres else sqlite_insert
            added = session.execute(
                insert(BarredMember)
                .values(guild_id=guild_id, user_id=user_id, barred_by=actor_id, barred_at=now)
                .on_conflict_do_nothing(index_elements=["guild_id", "user_id"])
                .returning(BarredMember.user_id)
            ).first()
            if added is not None:
                self._log(session, guild_id, actor_id, "bar", None, "barred", user_id, now=now)
            return added is not None

    def unbar(self, guild_id: int, user_id: int, actor_id: int) -> bool:
        """Let a barred member use the bot again; False when they were not barred."""
        with self._write.begin() as session:
            removed = session.execute(
                delete(BarredMember).where(BarredMember.guild_id == guild_id, BarredMember.user_id == user_id)
            ).rowcount
            if removed:
                self._log(session, guild_id, actor_id, "unbar", "barred", None, user_id)
            return bool(removed)

    def is_barred(self, guild_id: int, user_id: int) -> bool:
        with self._read.begin() as session:
            return self._is_barred(session, guild_id, user_id)

    @staticmethod
    def _is_barred(session: Session, guild_id: int, user_id: int) -> bool:
        return session.get(BarredMember, (guild_id, user_id)) is not None

    def barred(self, guild_id: int) -> list[int]:
        with self._read.begin() as session:
            query = (
                select(BarredMember.user_id).where(BarredMember.guild_id == guild_id).order_by(BarredMember.barred_at)
            )
            return list(session.scalars(query))

    def purge(self, guild_id: int, user_id: int, actor_id: int) -> list[int]:
        """Cancel a member's queued and running jobs on this server; their ids.

        Running jobs stop at their worker's next heartbeat, as with :meth:`Queue.cancel`.
        """
        now = self.clock()
        with self._write.begin() as session:
            ids = list(
                session.scalars(
                    select(Job.id)
                    .where(
                        Job.guild_id == guild_id,
                        Job.requester_id == user_id,
                        Job.status.in_(PENDING),
                    )
                    .order_by(Job.id)
                    .with_for_update()
                )
            )
            if not ids:
                return []
            session.execute(
                update(Job)
                .where(Job.id.in_(ids), Job.status.in_(PENDING))
                .values(
                    status=JobStatus.cancelled,
                    finished_at=now,
                    lease_until=None,
                    error="Cancelled by a moderator.",
                ),
                execution_options=_NO_UPDATE_SYNC,
            )
            self._log(session, guild_id, actor_id, "purge", None, f"{len(ids)} job(s): " + _show(ids), user_id, now=now)
        return ids

    def _log(
        self,
        session: Session,
        guild_id: int,
        actor_id: int,
        action: str,
        old: str | None,
        new: str | None,
        target_id: int | None = None,
        *,
        now: datetime | None = None,
    ) -> None:
        session.add(
            AuditEntry(
                guild_id=guild_id,
                actor_id=actor_id,
                created_at=now or self.clock(),
                action=action,
                target_id=target_id,
                old_value=old,
                new_value=new,
            )
        )

    def audit_log(self, guild_id: int, limit: int = 20) -> list[AuditEntry]:
        """The server's latest changes, newest first."""
        with self._read.begin() as session:
            query = (
                select(AuditEntry).where(AuditEntry.guild_id == guild_id).order_by(AuditEntry.id.desc()).limit(limit)
            )
            return list(session.scalars(query))

    # -- usage and stats ----------------------------------------------------------------------

    def usage(self, guild_id: int, user_id: int, since: datetime) -> Usage:
        """The member's jobs on this server created since ``since`` (for daily limit, cooldown)."""
        with self._read.begin() as session:
            return self._usage(session, guild_id, user_id, since)

    def _usage(self, session: Session, guild_id: int, user_id: int, since: datetime) -> Usage:
        count, first, last = session.execute(
            select(func.count(), func.min(Job.created_at), func.max(Job.created_at)).where(
                Job.guild_id == guild_id,
                Job.requester_id == user_id,
                Job.created_at >= since,
                Job.status != JobStatus.failed,
            )
        ).one()
        # min/max come back untyped (a string on SQLite): read them through the column type.
        return Usage(count, self._as_time(first), self._as_time(last))

    def _as_time(self, value: Any) -> datetime | None:
        if value is None or isinstance(value, datetime) and value.tzinfo is not None:
            return value
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC)

    def _seconds(self, start: ColumnElement, end: ColumnElement) -> ColumnElement:
        """``end - start`` in seconds, in this database's dialect."""
        if self._postgres:
            return func.extract("epoch", end) - func.extract("epoch", start)
        return (func.julianday(end) - func.julianday(start)) * 86400.0

    def stats(self, guild_id: int) -> ServerStats:
        now = self.clock()
        today, week = day_start(now), week_start(now)
        here = Job.guild_id == guild_id
        with self._read.begin() as session:
            jobs_today = session.scalar(select(func.count()).select_from(Job).where(here, Job.created_at >= today))
            by_status = dict(
                session.execute(
                    select(Job.status, func.count()).where(here, Job.created_at >= week).group_by(Job.status)
                ).all()
            )
            top = session.execute(
                select(Job.requester_id, func.count().label("n"))
                .where(here, Job.created_at >= week)
                .group_by(Job.requester_id)
                .order_by(func.count().desc(), Job.requester_id)
                .limit(10)
            ).all()
            wait, generation = session.execute(
                select(
                    func.avg(self._seconds(Job.created_at, Job.started_at)),
                    func.avg(self._seconds(Job.started_at, Job.finished_at)),
                ).where(
                    here,
                    Job.created_at >= week,
                    Job.status == JobStatus.done,
                    Job.started_at.is_not(None),
                    Job.finished_at.is_not(None),
                )
            ).one()
            pending = dict(
                session.execute(
                    select(Job.status, func.count()).where(here, Job.status.in_(PENDING)).group_by(Job.status)
                ).all()
            )
            queued_everywhere = session.scalar(
                select(func.count()).select_from(Job).where(Job.status == JobStatus.queued)
            )
            safety = dict(
                session.execute(
                    select(Job.safety_action, func.count())
                    .where(here, Job.created_at >= week, Job.safety_action.is_not(None))
                    .group_by(Job.safety_action)
                ).all()
            )
            reported = session.scalar(
                select(func.count(func.distinct(ResultReport.job_id)))
                .join(Job, Job.id == ResultReport.job_id)
                .where(here, Job.created_at >= week)
            )
        return ServerStats(
            jobs_today=jobs_today,
            jobs_week=sum(by_status.values()),
            week_by_status={status.value: n for status, n in by_status.items()},
            top_members=[(user_id, n) for user_id, n in top],
            avg_wait_seconds=None if wait is None else float(wait),
            avg_generation_seconds=None if generation is None else float(generation),
            queued_here=pending.get(JobStatus.queued, 0),
            running_here=pending.get(JobStatus.running, 0),
            queued_everywhere=queued_everywhere,
            safety_week=safety,
            reported_week=reported or 0,
        )
