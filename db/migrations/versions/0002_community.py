"""Community: member settings, server settings, barred members, the audit log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_guild_created", "jobs", ["guild_id", "created_at"])

    op.create_table(
        "member_settings",
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("sampler", sa.String(length=32), nullable=True),
        sa.Column("guidance", sa.Float(), nullable=True),
        sa.Column("private_results", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id"),
    )

    op.create_table(
        "server_settings",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("allowed_channel_ids", sa.JSON(), nullable=False),
        sa.Column("max_steps", sa.Integer(), nullable=True),
        sa.Column("max_width", sa.Integer(), nullable=True),
        sa.Column("max_height", sa.Integer(), nullable=True),
        sa.Column("max_count", sa.Integer(), nullable=True),
        sa.Column("pending_limit", sa.Integer(), nullable=True),
        sa.Column("daily_limit", sa.Integer(), nullable=True),
        sa.Column("cooldown_seconds", sa.Integer(), nullable=False),
        sa.Column("nsfw_words", sa.JSON(), nullable=False),
        sa.Column("default_model", sa.String(length=200), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("guild_id"),
    )

    op.create_table(
        "barred_members",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("barred_by", sa.BigInteger(), nullable=False),
        sa.Column("barred_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("guild_id", "user_id"),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("actor_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_id", sa.BigInteger(), nullable=True),
        sa.Column("old_value", sa.Text(), nullable=True),
        sa.Column("new_value", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_guild_id", "audit_log", ["guild_id", "id"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("barred_members")
    op.drop_table("server_settings")
    op.drop_table("member_settings")
    op.drop_index("ix_jobs_guild_created", table_name="jobs")
