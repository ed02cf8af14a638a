"""The engine-pool surface's read models: engines, streams and their statistics.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.JSON:
    return sa.JSON(none_as_null=True)


def upgrade() -> None:
    op.create_table(
        "pool_engines",
        sa.Column("pool_id", sa.String(), nullable=False),
        sa.Column("container_id", sa.String(), nullable=False),
        sa.Column("body", _json(), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "container_id", name="pk_pool_engines"),
    )
    op.create_table(
        "pool_streams",
        sa.Column("pool_id", sa.String(), nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("container_id", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("body", _json(), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "id", name="pk_pool_streams"),
    )
    op.create_index("ix_pool_streams_ended_at", "pool_streams", ["ended_at"])
    op.create_table(
        "pool_stream_stats",
        sa.Column("pool_id", sa.String(), nullable=False),
        sa.Column("stream_id", sa.String(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", _json(), nullable=False),
    )
    op.create_index("ix_pool_stream_stats_stream", "pool_stream_stats", ["pool_id", "stream_id", "ts"])
    op.create_index("ix_pool_stream_stats_ts", "pool_stream_stats", ["ts"])


def downgrade() -> None:
    op.drop_table("pool_stream_stats")
    op.drop_table("pool_streams")
    op.drop_table("pool_engines")
