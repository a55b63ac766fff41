"""clinical: prescription versions and legs, the leg a garment is worn on, re-attributions of stored readings

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 19:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prescriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("legs", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("supersedes_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f("fk_prescriptions_supersedes_id_prescriptions"), "prescriptions",
                                    ["supersedes_id"], ["id"])  # fmt: skip
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("leg", sa.String(length=8), nullable=True))
    op.create_table(
        "reattributions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("valid_from", sa.DateTime(), nullable=False),
        sa.Column("valid_to", sa.DateTime(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("done_at", sa.DateTime(), nullable=True),
        sa.Column("points", sa.Integer(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_reattributions_device_id_devices")),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"], name=op.f("fk_reattributions_patient_id_patients")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reattributions")),
    )
    with op.batch_alter_table("reattributions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reattributions_device_id"), ["device_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reattributions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reattributions_device_id"))
    op.drop_table("reattributions")
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_column("leg")
    with op.batch_alter_table("prescriptions", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_prescriptions_supersedes_id_prescriptions"), type_="foreignkey")
        batch_op.drop_column("supersedes_id")
        batch_op.drop_column("legs")
