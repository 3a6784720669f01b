"""Serving ``ops`` in a process of its own, as ``python -m bot --no-engine`` would: no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serving_ops_does_not_import_torch() -> None:
    program = """
import asyncio, sys
import aiohttp
from ops import Health, Metrics, OpsServer, OpsSettings

async def main():
    metrics = Metrics(queue_counts=dict, database_up=lambda: True, discord_connected=lambda: True)
    health = Health()
    health.add_check("database", lambda: True)
    async with OpsServer(OpsSettings(enabled=True, port=0), metrics=metrics, health=health) as server:
        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/healthz"):
                async with session.get(server.url + path) as response:
                    assert response.status == 200, (path, response.status)
                    await response.read()
    print("torch imported:", "torch" in sys.modules)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch imported: False"
