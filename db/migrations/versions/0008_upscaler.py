"""The U buttons' upscaler on ``jobs``: which upscaler enlarges the init image, and whether the
upscaled image is the result (Upscale (Subtle)) or gets an img2img pass (Upscale (Creative)).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Rows stored before this revision have no upscaler (their init image, already enlarged by the
bot, is used as it is) and are not upscale-only, from the server default.
Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("upscaler", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("upscale_only", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in ("upscale_only", "upscaler"):
            batch.drop_column(name)
