"""Fair order: the member served longest ago goes first (never served before anyone), first in,
first out within a member. Claiming serves the member, which sends them to the back; so the order
of the waiting jobs is round-robin over members (:func:`fair_order`). Only jobs that can run are in
line: those of a paused server wait outside it (:func:`server_not_paused`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, Member, ServerSettings


def fair_order(waiting: Iterable[tuple[int, int, datetime | None]]) -> list[int]:
    """Job ids in the order claims would take them, from ``(job_id, member_id, last_served_at)``.

    Members are ranked as :meth:`Queue.claim` ranks them (never served first, then served
    longest ago, ties by their oldest job); each claim sends its member to the back, so the
    result is round-robin over that ranking, each member's jobs in id order.
    """
    jobs_of: dict[int, list[int]] = {}
    served: dict[int, datetime | None] = {}
    for job_id, member_id, last_served_at in sorted(waiting):
        jobs_of.setdefault(member_id, []).append(job_id)
        served[member_id] = last_served_at
    members = sorted(jobs_of, key=lambda m: _member_rank(served[m], jobs_of[m][0]))
    rounds = itertools.zip_longest(*(jobs_of[m] for m in members))
    return [job_id for round_ in rounds for job_id in round_ if job_id is not None]


def server_not_paused() -> Any:
    """Jobs of a server whose managers paused the bot wait (DMs have no server: never paused)."""
    return ~(
        select(ServerSettings.guild_id)
        .where(ServerSettings.guild_id == Job.guild_id, ServerSettings.paused.is_(True))
        .exists()
    )


def _member_rank(last_served_at: datetime | None, first_job_id: int) -> tuple[bool, datetime, int]:
    never = datetime.min.replace(tzinfo=UTC)
    return (last_served_at is not None, last_served_at or never, first_job_id)


def place_in_line(session: Session, job_id: int) -> int | None:
    """1-based place of a queued job in fair order (as :func:`fair_order` would number it among
    the jobs that can run), in two queries whatever the length of the line; None when not queued.

    Round-robin puts the job, the member's ``k``-th waiting (0-based), in round ``k``: before it
    come the member's own ``k`` earlier jobs and, of every other member, ``min(n, k + 1)`` jobs
    when that member ranks ahead, else ``min(n, k)`` (``n``: their waiting jobs).
    """
    target = session.execute(
        select(Job.status, Job.requester_id, Member.last_served_at)
        .outerjoin(Member, Member.user_id == Job.requester_id)
        .where(Job.id == job_id)
    ).first()
    if target is None or target.status is not JobStatus.queued:
        return None
    waiting = (Job.status == JobStatus.queued, server_not_paused())
    mine = select(func.count(), func.min(Job.id)).where(*waiting, Job.requester_id == target.requester_id)
    earlier, first = session.execute(mine.where(Job.id < job_id)).one()
    k, first = earlier, min(first or job_id, job_id)  # the job counts even if its own server is paused
    served = target.last_served_at
    others = (
        select(
            Job.requester_id,
            func.count().label("n"),
            func.min(Job.id).label("first"),
            func.max(Member.last_served_at).label("served"),
        )
        .outerjoin(Member, Member.user_id == Job.requester_id)
        .where(*waiting, Job.requester_id != target.requester_id)
        .group_by(Job.requester_id)
        .subquery()
    )
    if served is None:  # never served: only other never-served members with older jobs rank ahead
        ahead = and_(others.c.served.is_(None), others.c.first < first)
    else:
        ahead = or_(
            others.c.served.is_(None), others.c.served < served, and_(others.c.served == served, others.c.first < first)
        )
    taken = case(
        (ahead, case((others.c.n < k + 1, others.c.n), else_=k + 1)), else_=case((others.c.n < k, others.c.n), else_=k)
    )
    before = session.scalar(select(func.coalesce(func.sum(taken), 0)))
    return k + int(before) + 1


def places_in_line(session: Session, job_ids: list[int]) -> dict[int, int | None]:
    """:func:`place_in_line` of several jobs (a group just stored) in one pass over the line: one
    query and one :func:`fair_order`, not two queries per job; None for a job not queued. (A job
    of a paused server is out of the line: :func:`place_in_line` places it, as rarely happens.)"""
    line = session.execute(
        select(Job.id, Job.requester_id, Member.last_served_at)
        .outerjoin(Member, Member.user_id == Job.requester_id)
        .where(Job.status == JobStatus.queued, server_not_paused())
    ).all()
    order = {job_id: n for n, job_id in enumerate(fair_order((row[0], row[1], _aware(row[2])) for row in line), 1)}
    return {job_id: order[job_id] if job_id in order else place_in_line(session, job_id) for job_id in job_ids}


def _aware(when: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back: UTC, as they were stored."""
    return when if when is None or when.tzinfo is not None else when.replace(tzinfo=UTC)
