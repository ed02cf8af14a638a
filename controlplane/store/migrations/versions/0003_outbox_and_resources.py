"""Signals kept with their operation (the outbox), and one open operation per resource.

Revision ID: 0003
Revises: 0002

``signals`` holds the bodies an operation publishes, so a gateway that crashed between
commit and publish sends them at its next start. ``resource`` names what an operation
holds while open (``swarm:<id>``, a pool, a container); the partial unique index that
allowed one open lifecycle operation per swarm id becomes one per resource.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN_WHERE = "status IN ('accepted', 'dispatched')"
OLD_WHERE = "lifecycle AND status IN ('accepted', 'dispatched')"


def upgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.add_column(sa.Column("signals", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("resource", sa.String(), nullable=True))
    op.execute("UPDATE operations SET resource = 'swarm:' || swarm_id WHERE lifecycle AND swarm_id IS NOT NULL")
    op.drop_index("uq_operations_open_lifecycle", table_name="operations")
    op.create_index("uq_operations_open_resource", "operations", ["resource"], unique=True,
                    sqlite_where=sa.text(OPEN_WHERE), postgresql_where=sa.text(OPEN_WHERE))


def downgrade() -> None:
    op.drop_index("uq_operations_open_resource", table_name="operations")
    op.create_index("uq_operations_open_lifecycle", "operations", ["swarm_id"], unique=True,
                    sqlite_where=sa.text(OLD_WHERE), postgresql_where=sa.text(OLD_WHERE))
    with op.batch_alter_table("operations") as batch:
        batch.drop_column("resource")
        batch.drop_column("signals")
