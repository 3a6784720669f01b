"""The tables: jobs, their result images, the Discord messages they were posted to, and members.

Discord ids (snowflakes) are 64-bit, hence ``BigInteger``. Our own primary keys stay ``Integer`` so
that SQLite makes them ``INTEGER PRIMARY KEY`` (an alias of the rowid, auto-incremented).
Times are stored as naive UTC and come back timezone-aware (:class:`UTCDateTime`), the same on
SQLite and PostgreSQL. Enums are stored by name in a short VARCHAR, so adding a value later
needs no ``ALTER TYPE``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime, stored naive so SQLite and PostgreSQL compare it alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: UTCDateTime(),
        int: Integer(),
        str: Text(),
        bytes: LargeBinary(),
    }


class JobStatus(enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.done, JobStatus.failed, JobStatus.cancelled})
PENDING = frozenset({JobStatus.queued, JobStatus.running})


class JobKind(enum.Enum):
    txt2img = "txt2img"
    img2img = "img2img"
    reroll = "reroll"
    variation = "variation"
    upscale = "upscale"
    edit = "edit"
    inpaint = "inpaint"  # /inpaint: an upload and its mask
    region = "region"  # Vary (Region): cells of a result
    zoom = "zoom"  # Zoom Out 1.5x / 2x
    pan = "pan"  # Pan left, right, up, down
    square = "square"  # Make Square
    describe = "describe"  # /describe: prompts for an uploaded image (engine.features.describe)


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, validate_strings=True)


class Job(Base):
    """One member's request, from the slash command until its result is posted."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)

    # Who asked, and where.
    requester_id: Mapped[int] = mapped_column(BigInteger)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)  # None in DMs
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind), default=JobKind.txt2img)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))

    # Every generation parameter, so that a reroll or a restart can replay the job exactly.
    prompt: Mapped[str]
    negative_prompt: Mapped[str] = mapped_column(default="")
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(default=25)
    guidance: Mapped[float] = mapped_column(Float, default=7.0)
    width: Mapped[int] = mapped_column(default=512)
    height: Mapped[int] = mapped_column(default=512)
    sampler: Mapped[str] = mapped_column(String(32), default="euler_a")
    count: Mapped[int] = mapped_column(default=1)
    strength: Mapped[float] = mapped_column(Float, default=0.75)
    init_image: Mapped[bytes | None]
    variation_seed: Mapped[int | None] = mapped_column(BigInteger)
    variation_strength: Mapped[float] = mapped_column(Float, default=0.0)
    model: Mapped[str | None] = mapped_column(String(200))  # None: any worker may take it
    clip_skip: Mapped[int] = mapped_column(default=1, server_default="1")
    mask: Mapped[bytes | None]  # PNG, white = repaint (inpainting, zoom, pan)
    mask_blur: Mapped[int] = mapped_column(default=4)
    inpaint_full_res: Mapped[bool] = mapped_column(Boolean, default=False)
    inpaint_padding: Mapped[int] = mapped_column(default=32)
    masked_content: Mapped[str] = mapped_column(String(16), default="original")
    schedule: Mapped[str] = mapped_column(String(32), default="automatic")  # the schedule type
    hires_scale: Mapped[float | None] = mapped_column(Float)  # None: no hires fix
    hires_steps: Mapped[int] = mapped_column(default=0)  # 0: the job's steps
    hires_upscaler: Mapped[str] = mapped_column(String(100), default="Latent")
    hires_strength: Mapped[float] = mapped_column(Float, default=0.7)
    upscaler: Mapped[str | None] = mapped_column(String(200))  # enlarges init_image first (the U buttons)
    upscale_only: Mapped[bool] = mapped_column(Boolean, default=False)  # the upscaled image is the result
    prompt_template: Mapped[str | None]  # Dynamic Prompts' template: each image draws its prompt from it
    tiling: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    chaos: Mapped[int | None]  # Midjourney's --chaos, 0-100; None: off
    control_units: Mapped[str | None] = mapped_column(Text)  # JSON (engine.control_units); None: none

    # Queue state.
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.queued)
    attempts: Mapped[int] = mapped_column(default=0)  # counted when the engine starts it
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]  # claimed by a worker
    # The engine took this attempt up (its first step); None while it waits for a place in the batch.
    engine_started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None]

    # Delivery: the interaction token lets us edit the original reply while it is valid (15 min).
    interaction_token: Mapped[str | None]
    interaction_app_id: Mapped[int | None] = mapped_column(BigInteger)
    interaction_expires_at: Mapped[datetime | None]
    status_message_id: Mapped[int | None] = mapped_column(BigInteger)  # queue place / progress
    status_channel_id: Mapped[int | None] = mapped_column(BigInteger)
    posted_at: Mapped[datetime | None]  # result (or failure notice) posted

    # The image check (bot/safety): None until the classifier has seen the images; the action is
    # what delivery did (posted, exempt, spoiler, blur, withheld); the review what moderators or
    # members decided since (reported, restored, deleted).
    safety_flagged: Mapped[bool | None] = mapped_column(Boolean)
    safety_label: Mapped[str | None] = mapped_column(String(64))
    safety_score: Mapped[float | None] = mapped_column(Float)
    safety_action: Mapped[str | None] = mapped_column(String(16))
    safety_review: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        Index("ix_jobs_status_id", "status", "id"),  # claim, position
        Index("ix_jobs_requester_status", "requester_id", "status"),  # pending limit
        Index("ix_jobs_status_lease", "status", "lease_until"),  # recover
        Index("ix_jobs_status_posted", "status", "posted_at"),  # undelivered
        Index("ix_jobs_safety_review", "guild_id", "safety_review"),  # /server review
    )

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status.name} by {self.requester_id}: {self.prompt[:30]!r}>"


class ResultImage(Base):
    """One PNG a job produced; stored so any process sharing the database can post it."""

    __tablename__ = "result_images"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int]
    seed: Mapped[int] = mapped_column(BigInteger)
    png: Mapped[bytes]

    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_result_images_job_index"),)


class PostedMessage(Base):
    """A Discord message that shows a job's result: how a 🔁 reaction finds its job."""

    __tablename__ = "posted_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    channel_id: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    created_at: Mapped[datetime]


class Member(Base):
    """A member's place in the fair order: who was served longest ago goes first."""

    __tablename__ = "members"

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    last_served_at: Mapped[datetime | None] = mapped_column(index=True)  # None: never served


# -- community: member defaults, server policy, moderation and its audit log -----------------------

# Stats and daily limits read a server's jobs by time.
Index("ix_jobs_guild_created", Job.guild_id, Job.created_at)
Index("ix_jobs_interaction_token", Job.interaction_token)  # answering interactions stranded by a crash


class MemberSettings(Base):
    """A member's own defaults, used whenever a command leaves the option out (None: the bot's)."""

    __tablename__ = "member_settings"

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    negative_prompt: Mapped[str | None]
    steps: Mapped[int | None]
    width: Mapped[int | None]
    height: Mapped[int | None]
    sampler: Mapped[str | None] = mapped_column(String(32))
    guidance: Mapped[float | None] = mapped_column(Float)
    schedule: Mapped[str | None] = mapped_column(String(32))
    hires_scale: Mapped[float | None] = mapped_column(Float)  # 1: off, even where the server's default is on
    hires_upscaler: Mapped[str | None] = mapped_column(String(100))
    private_results: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime]


class ServerSettings(Base):
    """One server's policy, set with /server. None or empty means the bot's configured default."""

    __tablename__ = "server_settings"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    allowed_channel_ids: Mapped[list[int]] = mapped_column(JSON, default=list)  # empty: every channel
    max_steps: Mapped[int | None]
    max_width: Mapped[int | None]
    max_height: Mapped[int | None]
    max_count: Mapped[int | None]
    pending_limit: Mapped[int | None]
    daily_limit: Mapped[int | None]  # jobs per member in any 24 hours
    cooldown_seconds: Mapped[int] = mapped_column(default=0)
    nsfw_words: Mapped[list[str]] = mapped_column(JSON, default=list)
    default_model: Mapped[str | None] = mapped_column(String(200))
    clip_skip: Mapped[int | None]  # the server's CLIP skip, over the model's own
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # /server safety; None: the configuration's [safety] values.
    safety_mode: Mapped[str | None] = mapped_column(String(16))
    safety_labels: Mapped[list[str] | None] = mapped_column(JSON)
    safety_threshold: Mapped[float | None] = mapped_column(Float)
    reveal_in_dm: Mapped[bool] = mapped_column(Boolean, default=False)
    reports_to_hide: Mapped[int | None]
    strikes: Mapped[int | None]  # withheld results before a member is barred; None: no strikes
    reference_modes_off: Mapped[list[str] | None] = mapped_column(JSON)  # /server references
    updated_at: Mapped[datetime]


class BarredMember(Base):
    """A member a server's managers have barred from using the bot there."""

    __tablename__ = "barred_members"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    barred_by: Mapped[int] = mapped_column(BigInteger)
    barred_at: Mapped[datetime]


class AuditEntry(Base):
    """One change a server manager made: who, when, what, and the value before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    guild_id: Mapped[int] = mapped_column(BigInteger)
    actor_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    action: Mapped[str] = mapped_column(String(64))
    target_id: Mapped[int | None] = mapped_column(BigInteger)  # the member acted on, if any
    old_value: Mapped[str | None]
    new_value: Mapped[str | None]

    __table_args__ = (Index("ix_audit_log_guild_id", "guild_id", "id"),)


class ResultReport(Base):
    """A member's report of a result (one per member and job)."""

    __tablename__ = "result_reports"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime]


class AppState(Base):
    """A named value kept between runs (e.g. the hash of the commands last synced to Discord)."""

    __tablename__ = "app_state"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str]


class Style(Base):
    """A server's named prompt template, as AUTOMATIC1111's styles.csv: ``{prompt}`` marks where
    the member's prompt goes (without it, the style is appended after a comma)."""

    __tablename__ = "styles"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    prompt: Mapped[str] = mapped_column(default="")
    negative_prompt: Mapped[str] = mapped_column(default="")


class Wildcard(Base):
    """A server's wildcard list (Dynamic Prompts' ``__name__``): one entry per line."""

    __tablename__ = "wildcards"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    lines: Mapped[str] = mapped_column(Text)  # the entries, joined by newlines


class PromptConfirmation(Base):
    """A command whose permutations make more jobs than one command may without asking: what was
    asked, until the member presses Queue them (its button names this row, so it outlives a restart)."""

    __tablename__ = "prompt_confirmations"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    asked: Mapped[dict] = mapped_column(JSON)  # bot.policy.Asked's fields
    done: Mapped[bool] = mapped_column(Boolean, default=False)  # pressed once: a second press queues nothing


class MemberStyle(Base):
    """The style a member uses on a server when they name none."""

    __tablename__ = "member_styles"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    style: Mapped[str] = mapped_column(String(100))
