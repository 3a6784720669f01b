"""Masked jobs: the mask and AUTOMATIC1111's inpainting options on ``jobs``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Rows stored before this revision get the defaults (blur 4, whole picture, padding 32, original
content) from the server defaults, so the NOT NULL columns can be added to a full table.
Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("mask", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("mask_blur", sa.Integer(), nullable=False, server_default="4"))
        batch.add_column(sa.Column("inpaint_full_res", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("inpaint_padding", sa.Integer(), nullable=False, server_default="32"))
        batch.add_column(sa.Column("masked_content", sa.String(length=16), nullable=False, server_default="original"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in ("masked_content", "inpaint_padding", "inpaint_full_res", "mask_blur", "mask"):
            batch.drop_column(name)
