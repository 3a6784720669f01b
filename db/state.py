"""Small named values the bot keeps between runs (the hash of the last command sync)."""

from __future__ import annotations

from sqlalchemy import Engine, select
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
