"""A job's ControlNet units (issue 22): ``jobs.control_units``, JSON as engine.control_units writes
it (each unit's ControlNet, image, preprocessor, weight, step window and modes).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

None for a job without units (every job stored before this revision).
Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("control_units", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("control_units")
