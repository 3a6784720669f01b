"""Jobs: the schedule type (jobs.schedule), chosen apart from the sampler as in AUTOMATIC1111.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Jobs stored before it ran get "automatic", the schedule each sampler had until then.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite allows it with a default): no copy of the jobs table.
    op.add_column("jobs", sa.Column("schedule", sa.String(length=32), nullable=False, server_default="automatic"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("schedule")
