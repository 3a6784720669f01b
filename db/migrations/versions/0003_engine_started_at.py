"""jobs.engine_started_at: when the engine took a job's attempt up (its first step), so that an
attempt counts then and not when a runner claimed the job for a place in its batch.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("engine_started_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("engine_started_at")
