"""`python -m bot` start-up failures: one clear line and a non-zero exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from processes import START_BUDGET

pytestmark = pytest.mark.slow  # each test starts `python -m bot`

ROOT = Path(__file__).resolve().parents[1]


def run_bot(tmp_path: Path, config: str | None, token: str | None) -> subprocess.CompletedProcess:
    path = tmp_path / "config.toml"
    if config is not None:
        path.write_text(config)
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    if token is not None:
        env["DISCORD_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_BUDGET,
    )


def config_text(tmp_path: Path, source: str) -> str:
    return (
        f'[model]\nsource = "{source}"\n[engine]\ndevice = "cpu"\n'
        f'[queue]\ndatabase_url = "sqlite:///{tmp_path}/db.sqlite3"\n'
    )


def test_missing_config_file(tmp_path):
    result = run_bot(tmp_path, None, "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/config.toml: config file not found (copy config.toml from the repository)"
    ]


def test_wrong_value_names_the_key(tmp_path):
    result = run_bot(tmp_path, config_text(tmp_path, "m") + "[generation]\nmax_steps = 0\n", "x")
    assert result.returncode == 2 and "generation.max_steps" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_token_says_what_to_do(tmp_path):
    result = run_bot(tmp_path, config_text(tmp_path, "m"), None)
    assert result.returncode == 2 and "DISCORD_TOKEN is not set" in result.stderr


def test_model_that_will_not_load(tmp_path):
    result = run_bot(tmp_path, config_text(tmp_path, str(tmp_path / "nowhere.safetensors")), "x")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nowhere.safetensors" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "db.sqlite3").exists()  # the database was created first
