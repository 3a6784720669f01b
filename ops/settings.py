"""The ``[ops]`` section of config.toml: where the operators' HTTP endpoint listens, if at all.

Off by default (``enabled = false``): the endpoint tells anyone who reaches it how busy the bot
is, so an operator turns it on knowingly. Parsed here, not in ``engine.config.settings``, because ops
may import neither the engine nor the bot; the checks and their one-line messages follow the
same form as the other sections (``key = value: not allowed; what is``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class OpsConfigError(ValueError):
    """A value in ``[ops]`` is not allowed; the message names the key."""


@dataclass(frozen=True)
class OpsSettings:
    enabled: bool = False
    host: str = "127.0.0.1"  # this machine only; "0.0.0.0" for a Prometheus on another machine
    port: int = 9100  # 0 (tests only, not from config.toml): the system picks a free port


def parse_ops(table: Any) -> OpsSettings:
    """``[ops]`` (the table itself, ``{}`` when the file has none) as OpsSettings."""
    if not isinstance(table, dict):
        raise OpsConfigError("[ops] must be a table")
    allowed = [f.name for f in fields(OpsSettings)]
    for key in table:
        if key not in allowed:
            raise OpsConfigError(f"ops.{key}: unknown key (allowed: {', '.join(allowed)})")
    enabled = table.get("enabled", OpsSettings.enabled)
    host = table.get("host", OpsSettings.host)
    port = table.get("port", OpsSettings.port)
    _expect("ops.enabled", enabled, bool)
    _expect("ops.host", host, str)
    _expect("ops.port", port, int)
    _check(
        bool(host) and host.strip() == host and " " not in host and "/" not in host,
        "ops.host",
        host,
        'an address to listen on, e.g. "127.0.0.1" (this machine only) or "0.0.0.0" (every interface)',
    )
    _check(1 <= port <= 65535, "ops.port", port, "1 to 65535 (to turn the endpoint off: ops.enabled = false)")
    return OpsSettings(enabled=enabled, host=host, port=port)


def _expect(key: str, value: Any, kind: type) -> None:
    # bool is an int in Python; a port of `true` is a mistake, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OpsConfigError(f"{key} = {value!r}: expected {kind.__name__}")


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise OpsConfigError(f"{key} = {value!r}: not allowed; {allowed}")
