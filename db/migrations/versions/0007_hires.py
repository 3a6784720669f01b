"""Hires fix on ``jobs``; members' default schedule type and hires fix; a server's CLIP skip.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

Jobs stored before it have no hires fix (``hires_scale`` NULL) and AUTOMATIC1111's defaults for
the rest; members and servers keep using the bot's defaults (NULL) until they set these.
Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("hires_scale", sa.Float(), nullable=True))
        batch.add_column(sa.Column("hires_steps", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("hires_upscaler", sa.String(length=100), nullable=False, server_default="Latent"))
        batch.add_column(sa.Column("hires_strength", sa.Float(), nullable=False, server_default="0.7"))
    with op.batch_alter_table("member_settings") as batch:
        batch.add_column(sa.Column("schedule", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("hires_scale", sa.Float(), nullable=True))
        batch.add_column(sa.Column("hires_upscaler", sa.String(length=100), nullable=True))
    with op.batch_alter_table("server_settings") as batch:
        batch.add_column(sa.Column("clip_skip", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("server_settings") as batch:
        batch.drop_column("clip_skip")
    with op.batch_alter_table("member_settings") as batch:
        for name in ("hires_upscaler", "hires_scale", "schedule"):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        for name in ("hires_strength", "hires_upscaler", "hires_steps", "hires_scale"):
            batch.drop_column(name)
