"""The one clock of the database layer: timezone-aware UTC now (the queue and the community take
it as a parameter, so tests can move time by hand)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
