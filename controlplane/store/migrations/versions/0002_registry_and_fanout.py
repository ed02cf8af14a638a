"""The component registry and fan-out operations.

Revision ID: 0002
Revises: 0001

``components`` is the gateway's registry: the last status each controller and bee
reported, and the container state its controller saw. ``operation_targets`` holds one row
per target of an operation that fans out under a single correlation id.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.JSON(none_as_null=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "components",
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("instance", sa.String(), nullable=False),
        sa.Column("swarm_id", sa.String(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("container_state", sa.String(32), nullable=True),
        _json("totals"),
        _json("queue_stats"),
        _json("data"),
        sa.Column("version", sa.String(16), nullable=True),
        _ts("first_seen"),
        _ts("last_seen", nullable=True),
        sa.PrimaryKeyConstraint("role", "instance", name="pk_components"),
    )
    op.create_index("ix_components_swarm_id", "components", ["swarm_id"])
    op.create_table(
        "operation_targets",
        sa.Column("correlation_id", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _json("outcome", nullable=True),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("correlation_id", "target", name="pk_operation_targets"),
        sa.ForeignKeyConstraint(["correlation_id"], ["operations.correlation_id"], ondelete="CASCADE",
                                name="fk_operation_targets_operation"),
    )


def downgrade() -> None:
    op.drop_table("operation_targets")
    op.drop_index("ix_components_swarm_id", "components")
    op.drop_table("components")
