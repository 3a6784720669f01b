"""The values :class:`db.community.Community` hands out: a member's defaults, a server's policy,
usage, admission and stats, each frozen, with the bot's defaults where nothing was set."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

#: How far back a member's daily limit looks: any 24 hours, not the calendar day.
DAY = timedelta(hours=24)


def day_start(now: datetime) -> datetime:
    """00:00 UTC of ``now``'s day: where "today" starts in /stats."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def week_start(now: datetime) -> datetime:
    """Monday 00:00 UTC of ``now``'s week: where "this week" starts in /stats."""
    return day_start(now) - timedelta(days=now.astimezone(UTC).weekday())


@dataclass(frozen=True)
class MemberDefaults:
    """What a member chose with /settings; None: the server's or the bot's default."""

    negative_prompt: str | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    schedule: str | None = None
    hires_scale: float | None = None  # the hires fix's factor; 1: off
    hires_upscaler: str | None = None
    private_results: bool = False


@dataclass(frozen=True)
class ServerPolicy:
    """A server's rules, from /server; None or empty: no narrower than the configuration."""

    allowed_channel_ids: tuple[int, ...] = ()
    max_steps: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    max_count: int | None = None
    pending_limit: int | None = None
    daily_limit: int | None = None
    cooldown_seconds: int = 0
    nsfw_words: tuple[str, ...] = ()
    default_model: str | None = None
    clip_skip: int | None = None  # None: each model's own (its config table's clip_skip)
    paused: bool = False
    # /server safety (bot/safety): None or empty where the server chose nothing ([safety]'s values)
    safety_mode: str | None = None  # off, spoiler, blur, withhold
    safety_labels: tuple[str, ...] = ()  # the classifier's labels that count
    safety_threshold: float | None = None  # the score at which they count
    reveal_in_dm: bool = False  # a blurred result's Reveal may DM the original to its requester
    reports_to_hide: int | None = None  # members' reports that hide a result until a moderator decides
    strikes: int | None = None  # withheld results after which a member is barred; None: off
    reference_modes_off: tuple[str, ...] = ()  # /imagine reference modes the server turned off


@dataclass(frozen=True)
class Usage:
    """A member's jobs on one server since some time (failed jobs do not count)."""

    count: int
    first_at: datetime | None
    last_at: datetime | None


@dataclass(frozen=True)
class Admission:
    """Everything a member's new job is checked against, read in one transaction.

    ``pending`` counts the member's queued and running jobs on every server (the queue's limit);
    ``usage`` is on this server since the time asked for, and only read when the server has a
    daily limit or a cooldown (otherwise zero).
    """

    defaults: MemberDefaults
    policy: ServerPolicy
    barred: bool
    pending: int
    usage: Usage


@dataclass(frozen=True)
class ServerStats:
    """One server's numbers for /stats. Averages are over this week's finished jobs."""

    jobs_today: int
    jobs_week: int
    week_by_status: dict[str, int]
    top_members: list[tuple[int, int]]  # (user id, jobs this week), most first
    avg_wait_seconds: float | None  # queued -> started
    avg_generation_seconds: float | None  # started -> finished
    queued_here: int
    running_here: int
    queued_everywhere: int  # the workers are shared: this server waits behind all of it
    safety_week: dict[str, int] = field(default_factory=dict)  # this week's results by image-check action
    reported_week: int = 0  # this week's results reported by members
