"""App state (small named values kept between runs: the command-sync hash, pending
acknowledgements), styles (servers' prompt templates, members' default style), and each
job's CLIP skip.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "app_state",
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "styles",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("guild_id", "name"),
    )
    op.create_table(
        "member_styles",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("style", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("guild_id", "user_id"),
    )
    op.create_index("ix_jobs_interaction_token", "jobs", ["interaction_token"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("clip_skip", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("clip_skip")
    op.drop_index("ix_jobs_interaction_token", table_name="jobs")
    op.drop_table("member_styles")
    op.drop_table("styles")
    op.drop_table("app_state")
