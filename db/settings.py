"""The ``[queue]`` section of config.toml as a value (checked by ``engine.config.settings``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueSettings:
    database_url: str = "sqlite:///data/sdbot.sqlite3"
    pending_limit: int = 3
    max_attempts: int = 3
    lease_seconds: float = 120.0
    #: The bot's journal of pending interactions (bot/journal.py); "": beside the SQLite file, or
    #: data/sdbot.interactions with PostgreSQL.
    journal_path: str = ""
