"""The /imagine reference modes a server's managers turned off (issue 22): ``server_settings.reference_modes_off``.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

None (every mode the model has a ControlNet for is on) for every server stored before this revision.
Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("server_settings") as batch:
        batch.add_column(sa.Column("reference_modes_off", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("server_settings") as batch:
        batch.drop_column("reference_modes_off")
