"""Small named values the bot keeps between runs: the hash of the last command sync, and the
interactions acknowledged before their job was stored (answered after a crash)."""

from __future__ import annotations

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import sessionmaker

from db.models import AppState


class StateStore:
    def __init__(self, engine: Engine) -> None:
        self._session = sessionmaker(engine, expire_on_commit=False)

    def get(self, key: str) -> str | None:
        with self._session() as session:
            return session.scalar(select(AppState.value).where(AppState.key == key))

    def put(self, key: str, value: str) -> None:
        with self._session.begin() as session:
            session.merge(AppState(key=key, value=value))

    def delete(self, key: str) -> None:
        with self._session.begin() as session:
            session.execute(delete(AppState).where(AppState.key == key))

    def with_prefix(self, prefix: str) -> dict[str, str]:
        """Every value whose key starts with ``prefix`` (which holds no ``%`` or ``_``)."""
        with self._session() as session:
            rows = session.execute(select(AppState.key, AppState.value).where(AppState.key.startswith(prefix)))
            return dict(rows.tuples().all())
