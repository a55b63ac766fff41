"""an override records the contraindications it covers

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 09:00:00.000000

Overrides recorded before this revision keep ``override_covers`` NULL (not
known); under the rules of this revision a riskier change needs a new
override anyway, so nothing depends on it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prescriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("override_covers", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prescriptions", schema=None) as batch_op:
        batch_op.drop_column("override_covers")
