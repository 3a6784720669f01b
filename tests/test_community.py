"""Contract tests of db.community (member defaults, server policy, moderation, audit log, stats),
run on SQLite and on PostgreSQL like the queue's."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine

from db.community import Community, MemberDefaults, ServerPolicy, day_start, week_start
from db.models import JobStatus
from db.queue import Queue
from db_fixtures import FakeClock

GUILD, OTHER_GUILD = 10**17 + 1, 10**17 + 2
ALICE, BOB, ADMIN = 2**62 + 11, 2**62 + 12, 2**62 + 13  # snowflakes need 64 bits


@pytest.fixture
def community(db_engine: Engine, clock: FakeClock) -> Community:
    return Community(db_engine, clock=clock)


def job(queue: Queue, user: int, guild: int | None = GUILD, **fields) -> int:
    fields.setdefault("prompt", "a cat")
    return queue.enqueue(requester_id=user, guild_id=guild, channel_id=1, **fields).id


def test_member_defaults_are_set_kept_and_reset(community: Community) -> None:
    assert community.member_defaults(ALICE) == MemberDefaults()
    community.set_member_defaults(ALICE, steps=12, negative_prompt="blurry", guidance=4.5)
    after = community.set_member_defaults(ALICE, width=768, height=512, private_results=True)
    assert after == MemberDefaults(
        negative_prompt="blurry", steps=12, width=768, height=512, guidance=4.5, private_results=True
    )
    assert community.member_defaults(ALICE) == after
    assert community.set_member_defaults(ALICE, steps=None).steps is None  # None clears one
    assert community.member_defaults(BOB) == MemberDefaults()  # members are apart
    community.reset_member_defaults(ALICE)
    assert community.member_defaults(ALICE) == MemberDefaults()
    with pytest.raises(TypeError, match="not member settings"):
        community.set_member_defaults(ALICE, seed=1)


def test_server_changes_are_kept_and_logged_with_who(community: Community, clock: FakeClock) -> None:
    assert community.server_policy(GUILD) == ServerPolicy()
    policy = community.update_server(
        GUILD, ADMIN, max_steps=20, allowed_channel_ids=[5, 2**63 - 1], nsfw_words=["gore"], cooldown_seconds=30
    )
    assert policy.allowed_channel_ids == (5, 2**63 - 1) and policy.nsfw_words == ("gore",)
    assert community.server_policy(GUILD) == policy
    assert community.server_policy(OTHER_GUILD) == ServerPolicy()

    clock.advance(60)
    community.update_server(GUILD, BOB, max_steps=30, cooldown_seconds=30)  # cooldown unchanged
    community.update_server(GUILD, ADMIN, paused=True)
    log = community.audit_log(GUILD)
    assert [(e.actor_id, e.action, e.old_value, e.new_value) for e in log[:2]] == [
        (ADMIN, "paused", "False", "True"),
        (BOB, "max_steps", "20", "30"),
    ]
    assert {e.action for e in log} == {"paused", "max_steps", "allowed_channel_ids", "nsfw_words", "cooldown_seconds"}
    assert log[-1].created_at < log[0].created_at == clock.now
    assert community.audit_log(OTHER_GUILD) == []
    with pytest.raises(TypeError, match="not server settings"):
        community.update_server(GUILD, ADMIN, token="x")


def test_bar_unbar_and_purge(community: Community, queue: Queue) -> None:
    assert community.bar(GUILD, BOB, ADMIN) is True
    assert community.bar(GUILD, BOB, ADMIN) is False  # once
    assert community.is_barred(GUILD, BOB) and not community.is_barred(OTHER_GUILD, BOB)
    assert community.barred(GUILD) == [BOB]
    assert community.unbar(GUILD, BOB, ADMIN) is True
    assert community.unbar(GUILD, BOB, ADMIN) is False
    assert not community.is_barred(GUILD, BOB)

    mine = [job(queue, BOB), job(queue, BOB)]
    elsewhere, alices = job(queue, BOB, OTHER_GUILD), job(queue, ALICE)
    running = queue.claim("w")
    assert running.id == mine[0]
    assert community.purge(GUILD, BOB, ADMIN) == mine
    assert [queue.get(i).status for i in mine] == [JobStatus.cancelled] * 2
    assert queue.get(mine[0]).error == "Cancelled by a moderator."
    assert queue.heartbeat(running.id, "w") is False  # the worker stops it
    assert queue.get(elsewhere).status is queue.get(alices).status is JobStatus.queued
    assert community.purge(GUILD, BOB, ADMIN) == []
    actions = [(e.action, e.target_id) for e in community.audit_log(GUILD)]
    assert actions == [("purge", BOB), ("unbar", BOB), ("bar", BOB)]


def test_paused_servers_jobs_are_not_claimed(community: Community, queue: Queue) -> None:
    paused, dm, other = job(queue, ALICE), job(queue, BOB, None), job(queue, BOB, OTHER_GUILD)
    community.update_server(GUILD, ADMIN, paused=True)
    assert {j.id for j in queue.claim_many("w", 5)} == {dm, other}
    assert queue.claim("w") is None
    community.update_server(GUILD, ADMIN, paused=False)
    assert queue.claim("w").id == paused


def test_usage_counts_a_members_recent_jobs_here(community: Community, queue: Queue, clock: FakeClock) -> None:
    first = clock.now
    job(queue, ALICE)
    clock.advance(600)
    job(queue, ALICE)
    job(queue, ALICE, OTHER_GUILD)
    failed = queue.claim_many("w", 5)
    for j in failed:
        if j.guild_id == GUILD and j.created_at > first:
            queue.fail(j.id, "w", "boom")  # our failures do not count
    usage = community.usage(GUILD, ALICE, since=first)
    assert (usage.count, usage.first_at, usage.last_at) == (1, first, first)
    clock.advance(10)
    j = job(queue, ALICE)
    usage = community.usage(GUILD, ALICE, since=first)
    assert (usage.count, usage.last_at) == (2, queue.get(j).created_at)
    assert community.usage(GUILD, BOB, since=first).count == 0


def test_admission_reads_everything_a_new_job_is_checked_against(
    community: Community, queue: Queue, clock: FakeClock
) -> None:
    start = clock.now
    community.set_member_defaults(ALICE, steps=12)
    job(queue, ALICE)
    job(queue, ALICE, OTHER_GUILD)  # the pending count is every server's
    seen = community.admission(GUILD, ALICE, since=start)
    assert seen.defaults.steps == 12 and seen.policy == ServerPolicy() and not seen.barred
    assert seen.pending == 2
    assert seen.usage.count == 0  # not read: no daily limit or cooldown here

    community.update_server(GUILD, ADMIN, daily_limit=5, max_steps=20)
    community.bar(GUILD, BOB, ADMIN)
    seen = community.admission(GUILD, ALICE, since=start)
    assert (seen.policy.daily_limit, seen.policy.max_steps) == (5, 20)
    assert (seen.usage.count, seen.usage.first_at) == (1, start)
    assert community.admission(GUILD, BOB, since=start).barred
    assert not community.admission(OTHER_GUILD, BOB, since=start).barred

    in_dm = community.admission(None, BOB, since=start)  # a DM: no server, no policy
    assert (in_dm.policy, in_dm.barred, in_dm.pending, in_dm.defaults) == (ServerPolicy(), False, 0, MemberDefaults())


def test_stats(community: Community, queue: Queue, clock: FakeClock) -> None:
    clock.now = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)  # a Wednesday
    assert week_start(clock.now) == datetime(2026, 1, 5, tzinfo=UTC)
    assert day_start(clock.now) == datetime(2026, 1, 7, tzinfo=UTC)
    clock.now = datetime(2026, 1, 4, 12, 0, tzinfo=UTC)  # last week: not counted
    job(queue, BOB)
    clock.now = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)  # this week, not today
    done = job(queue, ALICE)
    clock.advance(10)  # waited 10 s (last week's job too, but it is not this week's)
    claimed = queue.claim_many("w", 5)
    assert done in {j.id for j in claimed}
    clock.advance(4)  # generated in 4 s
    for j in claimed:
        assert queue.complete(j.id, "w", [])
    clock.now = datetime(2026, 1, 7, 9, 0, tzinfo=UTC)  # today
    job(queue, ALICE)
    job(queue, BOB)
    job(queue, ALICE, OTHER_GUILD)

    stats = community.stats(GUILD)
    assert (stats.jobs_today, stats.jobs_week) == (2, 3)
    assert stats.top_members == [(ALICE, 2), (BOB, 1)]
    assert stats.week_by_status == {"done": 1, "queued": 2}
    assert stats.avg_wait_seconds == pytest.approx(10, abs=0.01)
    assert stats.avg_generation_seconds == pytest.approx(4, abs=0.01)
    assert (stats.queued_here, stats.running_here) == (2, 0)
    assert stats.queued_everywhere == 3
    empty = community.stats(OTHER_GUILD + 1)
    assert (empty.jobs_week, empty.avg_wait_seconds, empty.top_members) == (0, None, [])
