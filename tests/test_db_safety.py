"""What the image filter stores (db/safety.py), on SQLite and on PostgreSQL: verdicts, actions
and their audit entries, one report per member, reviews, and the list /server review shows."""

from __future__ import annotations

from sqlalchemy import Engine

from db.community import Community
from db.queue import Queue
from db.safety import IMAGE_CHECK, SafetyRecords
from db_fixtures import FakeClock

GUILD = 10


def finished(queue: Queue, user: int) -> int:
    job = queue.enqueue(prompt="a cat", seed=1, requester_id=user, guild_id=GUILD, channel_id=5)
    claimed = queue.claim("gpu")
    assert claimed.id == job.id
    queue.complete(job.id, "gpu", [(b"png", 1)])
    return job.id


def test_verdicts_actions_reports_and_reviews(db_engine: Engine, queue: Queue, clock: FakeClock) -> None:
    records, community = SafetyRecords(db_engine, clock=clock), Community(db_engine, clock=clock)
    first, second, third = (finished(queue, user) for user in (1, 1, 2))
    records.record_verdicts([(first, True, "nsfw", 0.97), (second, True, "nsfw", 0.8), (third, False, "nsfw", 0.1)])
    assert records.record_action(queue.get(first), "withheld") == 1
    assert records.record_action(queue.get(second), "withheld") == 2  # the member's strikes on this server
    assert records.record_action(queue.get(third), "posted") == 0
    job = queue.get(first)
    assert (job.safety_flagged, job.safety_label, job.safety_score) == (True, "nsfw", 0.97)
    assert job.safety_action == "withheld"
    audit = community.audit_log(GUILD)
    assert [(e.actor_id, e.action, e.new_value) for e in audit] == [
        (IMAGE_CHECK, "image check", f"job #{second} withheld (nsfw 0.80)"),
        (IMAGE_CHECK, "image check", f"job #{first} withheld (nsfw 0.97)"),
    ]  # the clean one is not audited
    assert records.report(third, 7) == (True, 1)
    assert records.report(third, 7) == (False, 1)  # once per member
    assert records.report(third, 8) == (True, 2)
    assert [e.job_id for e in records.to_review(GUILD)] == [third, second, first]
    assert records.to_review(GUILD)[0].reports == 2
    assert records.set_review(queue.get(third), "reported", 8)
    assert not records.set_review(queue.get(third), "reported", 8)  # already hidden
    assert records.set_review(queue.get(first), "restored", 99)
    assert records.set_review(queue.get(second), "deleted", 99)
    assert [e.job_id for e in records.to_review(GUILD)] == [third]  # decided ones leave the list
    assert records.to_review(GUILD + 1) == []
    queue.mark_posted(third, 5, [1234])
    assert records.messages(third) == [(5, 1234)]
