"""Database faults under a running queue (issue 10 §2, §3), for before/after figures.

``pg-restart``: a PostgreSQL server of our own (tests/pg_cluster.py) serves a ``python -m engine
worker`` on the tiny model (max_batch 2); one job is queued, and while it runs (the worker has room
for another, so it keeps claiming) the server is stopped for 6 s and started again, then 2 more
jobs are queued. Prints the worker's exit status (None: still running) and each job's status 60 s
later.

``sqlite-lock``: a QueueRunner (in this process, on a stand-in engine) over a SQLite queue with a
0.2 s busy timeout; another connection holds ``BEGIN IMMEDIATE`` for 3 s, then a job is queued.
Prints whether the runner is still running and whether the job was made.

``--code DIR`` runs the checkout in DIR (e.g. an older one, for the "before" figure).

    python bench/db_outages.py pg-restart --model /path/to/tiny/sd1_folder [--code /work/main]
    python bench/db_outages.py sqlite-lock [--code /work/main]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
JOB = dict(prompt="a lighthouse", guidance=5.0, width=64, height=64, sampler="euler", channel_id=1)
CONFIG = """[model]
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
database_url = "{url}"
lease_seconds = 5
"""


def pg_restart(code: Path, model: str) -> None:
    from db.queue import Queue
    from db.session import make_engine, upgrade
    from pg_cluster import PgCluster, _free_port

    root = Path(tempfile.mkdtemp(prefix="sdbot-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = PgCluster(root, _free_port())
    cluster.init()
    cluster.start()
    db = make_engine(cluster.url)
    upgrade(db)
    queue = Queue(db, pending_limit=100, lease_seconds=5)
    jobs = [queue.enqueue(requester_id=1, seed=1, steps=60, **JOB).id]
    config = root / "config.toml"
    config.write_text(CONFIG.format(model=model, url=cluster.url))
    with (root / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", "--config", str(config)],
            cwd=code,
            env={**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        while not any(queue.get(j).status.name == "running" for j in jobs):
            time.sleep(0.1)
        cluster.stop()
        time.sleep(6)
        cluster.start()
        jobs += [queue.enqueue(requester_id=m, seed=m, steps=3, **JOB).id for m in (2, 3)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(queue.get(j).status.finished for j in jobs):
            time.sleep(0.5)
        print(f"worker exit status: {worker.poll()}; jobs: {[queue.get(j).status.name for j in jobs]}")
        lines = [
            line
            for line in (root / "worker.log").read_text().splitlines()
            if " ERROR " in line or " WARNING " in line or line.startswith("sqlalchemy.exc")
        ]
        print("worker log, errors and warnings:", *lines[-6:], sep="\n  ")
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(60)
        queue.close()
        db.dispose()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def sqlite_lock() -> None:
    import db.session
    from db.queue import Queue
    from db.session import make_engine, upgrade
    from engine.serving.runner import QueueRunner
    from test_outage_database import StepEngine

    path = Path(tempfile.mkdtemp()) / "queue.sqlite3"
    try:
        engine = make_engine(f"sqlite:///{path}", busy_timeout=0.2)
    except TypeError:  # older code: the busy timeout was a constant
        db.session.BUSY_TIMEOUT_MS = 200
        engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    queue = Queue(engine, pending_limit=100)
    runner = QueueRunner(queue, StepEngine(), worker_id="w1", poll_interval=0.1)

    async def scenario() -> None:
        task = asyncio.create_task(runner.run())
        other = sqlite3.connect(path, isolation_level=None)
        await asyncio.sleep(0.5)
        other.execute("BEGIN IMMEDIATE")
        await asyncio.sleep(3)
        other.execute("COMMIT")
        job = queue.enqueue(requester_id=1, seed=1, steps=3, **JOB).id
        for _ in range(200):
            if queue.get(job).status.finished:
                break
            await asyncio.sleep(0.1)
        died = task.done() and not task.cancelled()
        print(
            f"runner running: {not task.done()}; job after the lock: {queue.get(job).status.name}"
            + (f"; the runner died of {task.exception()!r}"[:160] if died else "")
        )
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["pg-restart", "sqlite-lock"])
    parser.add_argument("--code", type=Path, default=HERE, help="the checkout to run (default: this one)")
    parser.add_argument("--model", help="pg-restart: the tiny model's diffusers folder")
    args = parser.parse_args()
    sys.path[:0] = [str(args.code.resolve()), str(HERE / "tests")]  # its db/engine; our test helpers
    if args.scenario == "pg-restart":
        pg_restart(args.code.resolve(), args.model)
    else:
        sqlite_lock()


if __name__ == "__main__":
    main()
