"""Initial schema: idempotency records, operations, and the swarms read model.

Revision ID: 0001
Revises:

Self-contained on purpose: a migration must keep creating the same tables even after
``schema.py`` moves on, so nothing is imported from the application.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN_LIFECYCLE_WHERE = "lifecycle AND status IN ('accepted', 'dispatched')"


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.JSON(none_as_null=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "idempotency",
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("idempotency_key", sa.String(), nullable=False),
        sa.Column("request_hash", sa.String(), nullable=False),
        sa.Column("correlation_id", sa.String(), nullable=False),
        _json("envelope"),
        _ts("created_at"),
        _ts("expires_at"),
        sa.PrimaryKeyConstraint("action", "target", "idempotency_key", name="pk_idempotency"),
    )
    op.create_index("ix_idempotency_expires_at", "idempotency", ["expires_at"])
    op.create_index("ix_idempotency_correlation_id", "idempotency", ["correlation_id"])

    op.create_table(
        "operations",
        sa.Column("correlation_id", sa.String(), nullable=False),
        sa.Column("idempotency_key", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("signal", sa.String(), nullable=False),
        sa.Column("swarm_id", sa.String(), nullable=True),
        sa.Column("lifecycle", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _json("envelope"),
        sa.Column("timeout_ms", sa.Integer(), nullable=False),
        _ts("deadline"),
        _ts("created_at"),
        _ts("updated_at"),
        _json("outcome", nullable=True),
        sa.Column("creates_swarm", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("correlation_id", name="pk_operations"),
        sa.CheckConstraint(
            "status IN ('accepted', 'dispatched', 'succeeded', 'failed', 'timed_out')",
            name="ck_operations_status",
        ),
    )
    # The database, not the application, guarantees one open lifecycle operation per swarm.
    op.create_index(
        "uq_operations_open_lifecycle",
        "operations",
        ["swarm_id"],
        unique=True,
        sqlite_where=sa.text(OPEN_LIFECYCLE_WHERE),
        postgresql_where=sa.text(OPEN_LIFECYCLE_WHERE),
    )
    op.create_index("ix_operations_status_deadline", "operations", ["status", "deadline"])

    op.create_table(
        "swarms",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("template_id", sa.String(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("controller_instance", sa.String(), nullable=True),
        sa.Column("health", sa.String(32), nullable=False, server_default="unknown"),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        _json("bees"),
        _ts("last_heartbeat", nullable=True),
        _json("last_error", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_swarms"),
    )


def downgrade() -> None:
    op.drop_table("swarms")
    op.drop_index("ix_operations_status_deadline", table_name="operations")
    op.drop_index("uq_operations_open_lifecycle", table_name="operations")
    op.drop_table("operations")
    op.drop_index("ix_idempotency_correlation_id", table_name="idempotency")
    op.drop_index("ix_idempotency_expires_at", table_name="idempotency")
    op.drop_table("idempotency")
