"""Standalone GPU workers (``python -m engine worker``) sharing one PostgreSQL queue.

Real processes: two workers serve one queue; one is killed with SIGKILL in the middle of a job;
its job is taken over when the lease runs out and every job ends done exactly once.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from db.models import JobStatus
from db.queue import Queue
from db.session import make_engine, upgrade
from processes import BUDGET, START_BUDGET, Logged, free_port, start_logged, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
JOB = dict(prompt="a lighthouse", steps=12, guidance=5.0, width=64, height=64, sampler="euler", channel_id=1)


def write_config(path: Path, model: Path, database_url: str) -> Path:
    path.write_text(f"""
[model]
source = "{model}"
[engine]
device = "cpu"
max_batch = 2
[generation]
default_width = 64
default_height = 64
max_width = 256
max_height = 256
sizes = ["64x64"]
max_steps = 500
[queue]
database_url = "{database_url}"
lease_seconds = 5
""")
    return path


def start_worker(config: Path, name: str) -> Logged:
    """``python -m engine worker``, its output in a log beside the config (shown when a wait fails)."""
    return start_logged(
        name,
        [sys.executable, "-m", "engine", "worker", "--config", str(config), "--name", name],
        config.with_name(f"{name}.log"),
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
    )


def test_two_workers_one_killed_mid_job_every_job_done_once(pg_url, tiny_sd_folder, tmp_path):
    db = make_engine(pg_url)
    upgrade(db)
    queue = Queue(db, pending_limit=10, lease_seconds=5)
    jobs = [queue.enqueue(requester_id=member, seed=member * 10 + i, **JOB) for member in (1, 2, 3) for i in (0, 1)]
    config = write_config(tmp_path / "config.toml", tiny_sd_folder, pg_url)
    doomed, survivor = start_worker(config, "doomed"), None
    try:

        def started_by_doomed() -> list[int]:  # in the engine, so its attempt counts
            return [
                j.id
                for j in jobs
                if (job := queue.get(j.id)).status is JobStatus.running
                and job.engine_started_at is not None
                and (job.worker_id or "").split("/")[-1].startswith("doomed#")
            ]

        wait_for(started_by_doomed, "the first worker to start a job", budget=START_BUDGET, watched=[doomed])
        doomed.kill()
        taken = started_by_doomed()  # after the kill: the jobs it can no longer finish

        survivor = start_worker(config, "survivor")
        wait_for(
            lambda: all(queue.get(j.id).status.finished for j in jobs),
            "every job to finish",
            budget=START_BUDGET + BUDGET,
            watched=[survivor],
        )

        for job in jobs:
            stored = queue.get(job.id)
            assert stored.status is JobStatus.done, stored.error
            assert [image.seed for image in queue.images(job.id)] == [job.seed]
        assert taken and all(queue.get(i).attempts == 2 for i in taken)

        survivor.process.send_signal(signal.SIGTERM)
        assert survivor.exit_status() == 0, survivor.tail()
    finally:
        for child in (doomed, survivor):
            if child is not None:
                child.kill()
        queue.close()
        db.dispose()


def test_a_worker_stopped_by_sigterm_gives_its_job_back(tiny_sd_folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    db = make_engine(url)
    upgrade(db)
    queue = Queue(db, pending_limit=10)
    job = queue.enqueue(requester_id=1, seed=1, **{**JOB, "steps": 500})
    worker = start_worker(write_config(tmp_path / "config.toml", tiny_sd_folder, url), "w")
    try:
        wait_for(
            lambda: queue.get(job.id).status is JobStatus.running,
            "the worker to claim the job",
            budget=START_BUDGET,
            watched=[worker],
        )
        worker.process.send_signal(signal.SIGTERM)
        assert worker.exit_status() == 0, worker.tail()
        stored = queue.get(job.id)
        assert stored.status is JobStatus.queued and stored.attempts == 0
    finally:
        worker.kill()
        queue.close()
        db.dispose()


def test_a_worker_serves_health_and_metrics_when_ops_is_on(tmp_path, tiny_sd_folder):
    import urllib.request

    port = free_port()
    url = f"sqlite:///{tmp_path}/q.sqlite3"
    config = write_config(tmp_path / "config.toml", tiny_sd_folder, url)
    config.write_text(config.read_text() + f"[ops]\nenabled = true\nport = {port}\n")
    db = make_engine(url)
    upgrade(db)
    queue = Queue(db, pending_limit=10)
    job = queue.enqueue(requester_id=1, seed=1, **JOB)
    worker = start_worker(config, "ops")
    try:
        wait_for(
            lambda: queue.get(job.id).status is JobStatus.done,
            "the worker to run the job",
            budget=START_BUDGET + BUDGET,
            watched=[worker],
        )

        def answer(path: str):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
                return response.status, response.read().decode()

        status, body = answer("/healthz")
        assert status == 200 and '"queue-runner": true' in body and '"database": true' in body
        wait_for(
            lambda: 'sdbot_jobs_finished_total{status="done"} 1.0' in answer("/metrics")[1],
            "the finished job in the metrics",
            budget=BUDGET,
            watched=[worker],
        )
        assert 'sdbot_queue_jobs{status="done"} 1.0' in answer("/metrics")[1]
    finally:
        worker.process.send_signal(signal.SIGTERM)
        worker.process.wait(120)
        db.dispose()


def test_the_bots_engine_process_ends_at_once_when_the_bot_is_gone_before_it_serves(tmp_path, tiny_sd_folder):
    """``--bot-link``: the bot is watched from the first moment. Killed while its child is still
    starting (here: before the child has even imported torch), the child ends then and there,
    as on an operator's SIGTERM, and claims nothing."""
    import os
    import subprocess

    url = f"sqlite:///{tmp_path}/q.sqlite3"
    config = write_config(tmp_path / "config.toml", tiny_sd_folder, url)
    db = make_engine(url)
    upgrade(db)
    queue = Queue(db, pending_limit=10)
    job = queue.enqueue(requester_id=1, seed=1, **JOB)
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "engine", "worker", "--config", str(config), "--bot-link", str(write_fd)],
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(write_fd,),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    os.close(write_fd)
    try:
        child.stdin.close()  # the bot's end of the pipe, as a kill -9 of the bot closes it
        assert child.wait(START_BUDGET) == -signal.SIGTERM, child.stderr.read().decode()[-2000:]
        assert os.read(read_fd, 1 << 16) == b""  # it never reported ready
        stored = queue.get(job.id)
        assert stored.status is JobStatus.queued and stored.worker_id is None and stored.attempts == 0
    finally:
        if child.poll() is None:
            child.kill()
        os.close(read_fd)
        queue.close()
        db.dispose()
