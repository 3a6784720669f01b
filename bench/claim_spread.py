"""Fairness across concurrent claimers (issue 10 §3): several processes claim from one queue at once.

A queue holds ``--jobs`` jobs of each of ``--members`` members, all waiting. ``--processes``
processes (separate interpreters, as separate workers would be) start together and each makes
``--claims`` claims, one job at a time, as the queue runner does. Claimed in fair order, every
member has been served the same number of times (within one) after any number of claims; the
script prints how many jobs each member got and the spread (most minus fewest).

    python bench/claim_spread.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test
    python bench/claim_spread.py --url sqlite:////tmp/spread.sqlite3 --processes 4 --claims 100

The database's jobs/members tables are emptied first (use a scratch database or schema).
Exit status 1 when the spread is over ``--max-spread``.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import delete, insert, select  # noqa: E402

from db.clock import utcnow  # noqa: E402
from db.models import Job, JobStatus, Member, PostedMessage, ResultImage  # noqa: E402
from db.queue import Queue  # noqa: E402
from db.session import make_engine, upgrade  # noqa: E402


def fill(url: str, members: int, jobs: int) -> None:
    """An empty queue, then ``jobs`` waiting jobs of each member, interleaved by member."""
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as connection:
        for table in (PostedMessage, ResultImage, Job, Member):
            connection.execute(delete(table))
        now = utcnow()
        rows = [
            dict(requester_id=1000 + m, prompt=f"job {i}", seed=i, status=JobStatus.queued, attempts=0, created_at=now)
            for i in range(jobs)
            for m in range(members)
        ]
        connection.execute(insert(Job), rows)
    engine.dispose()


def claimer(url: str, claims: int, go: Path) -> None:
    """One process: wait for the start signal, then claim ``claims`` jobs one by one."""
    engine = make_engine(url)
    queue = Queue(engine, pending_limit=10**9)
    queue.get(1)  # connect before the start, so the processes really claim together
    while not go.exists():
        time.sleep(0.001)
    for _ in range(claims):
        queue.claim(f"claimer-{os.getpid()}")
    engine.dispose()


def served(url: str) -> dict[int, int]:
    """Jobs claimed (running) per member."""
    engine = make_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(select(Job.requester_id).where(Job.status == JobStatus.running)).scalars()
        counts = collections.Counter(rows)
        members = connection.execute(select(Member.user_id)).scalars().all()
    engine.dispose()
    return {m: counts.get(m, 0) for m in members}


def measure(url: str, *, processes: int, claims: int, members: int, jobs: int, go: Path) -> dict[int, int]:
    """Run the claimers against a freshly filled queue; jobs served per member."""
    fill(url, members, jobs)
    go.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[4]); "
        "from claim_spread import claimer; claimer(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", code, url, str(claims), str(go), str(Path(__file__).parent)], env=env)
        for _ in range(processes)
    ]
    time.sleep(1.0)  # let them connect; not needed for correctness, only so that they start together
    go.touch()
    for child in children:
        if child.wait(600) != 0:
            raise SystemExit(f"a claimer exited with status {child.returncode}")
    return served(url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--claims", type=int, default=400, help="claims per process")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=400, help="waiting jobs per member")
    parser.add_argument("--max-spread", type=int, default=1)
    args = parser.parse_args()
    go = Path(f"/tmp/claim_spread_go_{os.getpid()}")
    started = time.monotonic()
    counts = measure(
        args.url, processes=args.processes, claims=args.claims, members=args.members, jobs=args.jobs, go=go
    )
    go.unlink(missing_ok=True)
    spread = max(counts.values()) - min(counts.values())
    print(
        f"{args.processes} processes x {args.claims} claims over {args.members} members: "
        f"served {sorted(counts.values())}, spread {spread} ({time.monotonic() - started:.1f} s)"
    )
    return 0 if spread <= args.max_spread else 1


if __name__ == "__main__":
    sys.exit(main())
