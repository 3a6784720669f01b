"""``[ops]`` of config.toml: defaults, and one clear line naming the key for each wrong value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ops.settings import OpsConfigError, OpsSettings, parse_ops

REPO = Path(__file__).resolve().parents[1]


def test_off_by_default() -> None:
    assert parse_ops({}) == OpsSettings(enabled=False, host="127.0.0.1", port=9100)


def test_the_repository_config_leaves_it_off() -> None:
    raw = tomllib.loads((REPO / "config.toml").read_text())
    assert parse_ops(raw.get("ops", {})).enabled is False


def test_values_from_the_table() -> None:
    assert parse_ops({"enabled": True, "host": "0.0.0.0", "port": 9464}) == OpsSettings(True, "0.0.0.0", 9464)
    assert parse_ops({"enabled": True, "host": "::1"}).host == "::1"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"prot": 9100}, "ops.prot: unknown key (allowed: enabled, host, port)"),
        ({"port": "9100"}, "ops.port = '9100': expected int"),
        ({"port": True}, "ops.port = True: expected int"),
        ({"port": 9100.0}, "ops.port = 9100.0: expected int"),
        ({"enabled": "yes"}, "ops.enabled = 'yes': expected bool"),
        ({"enabled": 1}, "ops.enabled = 1: expected bool"),
        ({"host": 127}, "ops.host = 127: expected str"),
        ({"port": 0}, "ops.port = 0: not allowed; 1 to 65535 (to turn the endpoint off: ops.enabled = false)"),
        ({"port": 65536}, "ops.port = 65536: not allowed; 1 to 65535"),
        ({"host": ""}, "ops.host = '': not allowed; an address to listen on"),
        ({"host": "http://127.0.0.1"}, "ops.host = 'http://127.0.0.1': not allowed; an address to listen on"),
        ({"host": " 127.0.0.1"}, "ops.host = ' 127.0.0.1': not allowed"),
    ],
)
def test_wrong_values_name_the_key(table: dict, message: str) -> None:
    with pytest.raises(OpsConfigError) as caught:
        parse_ops(table)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_ops_must_be_a_table() -> None:
    with pytest.raises(OpsConfigError, match=r"^\[ops\] must be a table$"):
        parse_ops(9100)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(OpsConfigError, ValueError)
