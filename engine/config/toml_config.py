"""Reading a TOML table into a frozen dataclass, with one-line errors naming the key.

Shared by every section of ``config.toml`` (the engine's, the queue's, the bot's): a key the
dataclass does not have, or a value of another type than its default's, stops the start with
one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A value in config.toml is missing or not allowed; the message names the key."""


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read config.toml; a missing file or a syntax error becomes a ConfigError."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (copy config.toml from the repository)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def section(raw: dict[str, Any], name: str, cls: type) -> Any:
    """Build dataclass ``cls`` from table ``[name]``, checking key names and value types."""
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls) if not f.metadata.get("derived")}  # derived: not read from the file
    for key in table:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (allowed: {', '.join(known)})")
    values = {}
    for key, value in table.items():
        default = getattr(cls(), key) if _has_defaults(cls) else None
        values[key] = _coerce(f"{name}.{key}", value, default)
    return cls(**values)


def _has_defaults(cls: type) -> bool:
    try:
        cls()
    except TypeError:
        return False
    return True


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the default value of the same key."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, list)
        value = tuple(value) if ok else value
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {type(default).__name__.replace('tuple', 'list')}")
    return value


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r}: not allowed; {allowed}")
