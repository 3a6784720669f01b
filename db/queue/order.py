"""Fair order: the member served longest ago goes first (never served before anyone), first in,
first out within a member. Claiming serves the member, which sends them to the back; so the order
of the waiting jobs is round-robin over members (:func:`fair_order`). Only jobs that can run are in
line: those of a paused server wait outside it (:func:`server_not_paused`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from db.models import Job, ServerSettings


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
    never = datetime.min.replace(tzinfo=timezone.utc)
    return (last_served_at is not None, last_served_at or never, first_job_id)
