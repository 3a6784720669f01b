"""Small named values the bot keeps between runs: the hash of the last command sync, and the
interactions acknowledged before their job was stored (answered after a crash)."""

from __future__ import annotations

from sqlalchemy import Engine, delete, insert, select

from db.models import AppState
from db.session import session_makers


class StateStore:
    def __init__(self, engine: Engine) -> None:
        self._write, self._read = session_makers(engine)  # reads do not wait for SQLite's write turn

    def get(self, key: str) -> str | None:
        with self._read() as session:
            return session.scalar(select(AppState.value).where(AppState.key == key))

    def put(self, key: str, value: str) -> None:
        with self._write.begin() as session:
            session.merge(AppState(key=key, value=value))

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def put_many(self, values: dict[str, str]) -> None:
        """Add or replace several values in one transaction."""
        if not values:
            return
        with self._write.begin() as session:
            session.execute(delete(AppState).where(AppState.key.in_(list(values))))
            session.execute(insert(AppState), [{"key": key, "value": value} for key, value in values.items()])

    def delete_many(self, keys: list[str]) -> None:
        if not keys:
            return
        with self._write.begin() as session:
            session.execute(delete(AppState).where(AppState.key.in_(keys)))

    def with_prefix(self, prefix: str) -> dict[str, str]:
        """Every value whose key starts with ``prefix`` (which holds no ``%`` or ``_``)."""
        with self._read() as session:
            rows = session.execute(select(AppState.key, AppState.value).where(AppState.key.startswith(prefix)))
            return dict(rows.tuples().all())
