"""Commands waiting for the member's word: what they asked, kept until they press its button.

A prompt whose permutations make more jobs than a command may without asking is stored here and
answered with a button naming the row (``sd:permute:<id>``), so the press is understood after a
restart. A row is taken once (a second press, or another member's, queues nothing) and only
within :data:`KEPT_FOR`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, update

from db.models import PromptConfirmation
from db.session import session_makers

#: How long a confirmation may wait for its press (Discord's interaction tokens last 15 minutes;
#: the button itself outlives them, a day is plenty to decide).
KEPT_FOR = timedelta(days=1)


class Confirmations:
    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] | None = None) -> None:
        self._write, self._read = session_makers(engine)
        self.clock = clock or (lambda: datetime.now(UTC))

    def add(self, user_id: int, guild_id: int | None, channel_id: int | None, asked: dict[str, Any]) -> int:
        with self._write.begin() as session:
            row = PromptConfirmation(
                user_id=user_id, guild_id=guild_id, channel_id=channel_id, created_at=self.clock(), asked=asked,
                done=False,
            )  # fmt: skip
            session.add(row)
            session.flush()
            return row.id

    def take(self, confirmation_id: int, user_id: int) -> dict[str, Any] | None:
        """What ``user_id`` asked in confirmation ``confirmation_id``, marked taken in the same
        transaction; None when it is not theirs, was taken already, or is older than KEPT_FOR."""
        with self._write.begin() as session:
            taken = session.execute(
                update(PromptConfirmation)
                .where(
                    PromptConfirmation.id == confirmation_id,
                    PromptConfirmation.user_id == user_id,
                    PromptConfirmation.done.is_(False),
                    PromptConfirmation.created_at >= self.clock() - KEPT_FOR,
                )
                .values(done=True)
            )
            if taken.rowcount != 1:
                return None
            return session.get(PromptConfirmation, confirmation_id).asked

    def release(self, confirmation_id: int) -> None:
        """Taken, then refused (a limit, a fault): the member may press again."""
        with self._write.begin() as session:
            session.execute(
                update(PromptConfirmation).where(PromptConfirmation.id == confirmation_id).values(done=False)
            )
