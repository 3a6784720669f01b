"""A PostgreSQL server of the test's own, on a free port, that the test stops and starts at will
(the shared one at 5432 must not be restarted under the other tests).

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user (its
folder is made outside pytest's root-only tmp dir and handed over). Tests that use it are skipped,
saying why, where the PostgreSQL 15 binaries are missing.

(Not a test module: outage tests import the fixture from it.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from processes import free_port

BIN = Path(os.environ.get("SDBOT_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PgCluster:
    """One throwaway cluster: :meth:`start`, :meth:`stop` (fast shutdown: sessions are cut off)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.data, self.log = root / "data", root / "server.log"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = [str(BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}{log[-2000:]}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "120", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "120", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A started cluster of this test's own (database ``postgres``, user ``postgres``, trust)."""
    if not (BIN / "initdb").exists() or not (BIN / "pg_ctl").exists():
        pytest.skip(
            f"PostgreSQL binaries not found in {BIN} (set SDBOT_TEST_PG_BIN): cannot start a "
            "server of the test's own to restart"
        )
    root = Path(tempfile.mkdtemp(prefix="sdbot-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = PgCluster(root, free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            try:
                cluster.stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(root, ignore_errors=True)
