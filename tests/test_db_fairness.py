"""Fair order across concurrent claimers (issue 10 §3): several real processes claim from one
queue at once, as several workers do, and every member is still served in turn.

Each of 4 processes makes 100 claims from a queue of 8 members' jobs (100 each); after those
400 claims every member has had 50. Before claims took turns on PostgreSQL, a claimer that
skipped a row another was locking took the same member's next job (spread 9 here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from claim_spread import measure


@pytest.mark.slow
def test_concurrent_claimers_serve_every_member_in_turn(db_url: str, tmp_path: Path) -> None:
    served = measure(db_url, processes=4, claims=100, members=8, jobs=100, go=tmp_path / "go")
    assert sum(served.values()) == 400
    assert max(served.values()) - min(served.values()) <= 1, served
