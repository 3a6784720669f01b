"""Image safety: each result's classification and what delivery did with it, members' reports,
and each server's image policy.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

``jobs.safety_flagged`` is None until the classifier has seen the job's images (jobs stored
before this revision stay None: they were posted under no image policy). ``safety_action`` is
what delivery did (posted, exempt, spoiler, blur, withheld); ``safety_review`` a moderator's or
the members' decision (reported, restored, deleted). A server's columns are None where it chose
nothing: the configuration's ``[safety]`` values apply.
Migrations never import db.models: they describe the schema as it was at their revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("safety_flagged", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("safety_label", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("safety_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("safety_action", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("safety_review", sa.String(length=16), nullable=True))
    with op.batch_alter_table("server_settings") as batch:
        batch.add_column(sa.Column("safety_mode", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("safety_labels", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("safety_threshold", sa.Float(), nullable=True))
        batch.add_column(sa.Column("reveal_in_dm", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("reports_to_hide", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("strikes", sa.Integer(), nullable=True))
    op.create_table(
        "result_reports",
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_jobs_safety_review", "jobs", ["guild_id", "safety_review"])


def downgrade() -> None:
    op.drop_index("ix_jobs_safety_review", table_name="jobs")
    op.drop_table("result_reports")
    with op.batch_alter_table("server_settings") as batch:
        for name in ("strikes", "reports_to_hide", "reveal_in_dm", "safety_threshold", "safety_labels", "safety_mode"):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        for name in ("safety_review", "safety_action", "safety_score", "safety_label", "safety_flagged"):
            batch.drop_column(name)
