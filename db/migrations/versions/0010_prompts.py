"""Prompts as members write them: Dynamic Prompts' templates, tiling, chaos, wildcard lists and
the permutations waiting for a member's confirmation.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

``jobs.prompt_template`` is None for a job whose images all have its prompt (every job stored
before this revision). ``tiling`` defaults to off, ``chaos`` is None (off). ``wildcards`` holds each server's
lists by name, their lines joined by newlines; ``prompt_confirmations`` what a member asked that
makes more jobs than a command may without asking, until they press its button.
Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("prompt_template", sa.Text(), nullable=True))
        batch.add_column(sa.Column("tiling", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("chaos", sa.Integer(), nullable=True))
    op.create_table(
        "wildcards",
        sa.Column("guild_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("lines", sa.Text(), nullable=False),
    )
    op.create_table(
        "prompt_confirmations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("channel_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("asked", sa.JSON(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("prompt_confirmations")
    op.drop_table("wildcards")
    with op.batch_alter_table("jobs") as batch:
        for name in ("chaos", "tiling", "prompt_template"):
            batch.drop_column(name)
