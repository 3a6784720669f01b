"""What the operators' endpoint reads from the database: jobs per status, and whether it answers.

Both are plain functions of a SQLAlchemy Engine, called at scrape time on a thread of the
endpoint's own (never on the event loop). They read in a ``BEGIN DEFERRED`` transaction on
SQLite so that a scrape never takes the write turn from the queue's writers.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from db.models import Job

log = logging.getLogger("ops")


def queue_counts(engine: Engine) -> dict[str, int]:
    """Jobs in the database by status (``{"queued": 3, "running": 1, ...}``), one GROUP BY.

    Statuses without jobs are left out (``Metrics`` shows them as 0). ``ix_jobs_status_id``
    lets both SQLite and PostgreSQL count from the index, without reading the jobs' rows.
    """
    with _reader(engine) as connection:
        rows = connection.execute(select(Job.status, func.count()).group_by(Job.status))
        return {status.value: count for status, count in rows}


def database_reachable(engine: Engine) -> bool:
    """Whether the database answers a ``SELECT 1`` now (False, logged at debug level, when not)."""
    try:
        with _reader(engine) as connection:
            connection.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as e:
        log.debug("database unreachable: %s", e)
        return False
    return True


def _reader(engine: Engine):
    return engine.execution_options(sqlite_begin="DEFERRED").connect()
