"""tests/processes.py: a wait on a child process fails with its log, at once when it has exited."""

from __future__ import annotations

import sys

import pytest

from processes import start_logged, wait_for

pytestmark = pytest.mark.slow  # starts Python processes


def test_a_wait_fails_at_once_with_the_log_of_a_process_that_exited(tmp_path):
    child = start_logged(
        "bot", [sys.executable, "-c", "print('no token'); raise SystemExit(2)"], tmp_path / "bot.log", cwd=tmp_path
    )
    with pytest.raises(AssertionError) as failure:
        wait_for(lambda: False, "the bot to connect", watched=[child])  # the 300 s budget never runs out
    assert "bot exited with 2" in str(failure.value) and "no token" in str(failure.value)


def test_a_wait_that_runs_out_shows_each_log_tail(tmp_path):
    child = start_logged(
        "worker",
        [sys.executable, "-c", "print('loading', flush=True); import time; time.sleep(600)"],
        tmp_path / "worker.log",
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: "loading" in child.tail(), "the first line")
        with pytest.raises(AssertionError) as failure:
            wait_for(lambda: False, "the worker to claim a job", budget=0.1, watched=[child])
        assert "waiting for the worker to claim a job" in str(failure.value)
        assert "--- worker (log tail) ---" in str(failure.value) and "loading" in str(failure.value)
    finally:
        child.kill()
    assert child.process.returncode is not None
