"""The streams registry: created stream types, advertised streams, sessions' history.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.JSON:
    return sa.JSON(none_as_null=True)


def upgrade() -> None:
    op.create_table(
        "stream_types",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("body", _json(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_stream_types"),
    )
    op.create_table(
        "streams_advertised",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("body", _json(), nullable=False),
        sa.Column("advertised_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_streams_advertised"),
    )
    op.create_table(
        "stream_sessions",
        sa.Column("session_id", sa.String(36), nullable=False),
        sa.Column("stream_id", sa.String(36), nullable=False),
        sa.Column("stream_name", sa.String(255), nullable=False),
        sa.Column("stream_type", sa.String(100), nullable=False),
        sa.Column("publisher_id", sa.String(255), nullable=False),
        sa.Column("publisher_address", sa.String(255), nullable=False),
        sa.Column("publisher_port", sa.Integer(), nullable=False),
        sa.Column("consumer_id", sa.String(255), nullable=False),
        sa.Column("consumer_address", sa.String(255), nullable=False),
        sa.Column("consumer_port", sa.Integer(), nullable=True),
        sa.Column("protocol", sa.String(32), nullable=False),
        sa.Column("transport_config", _json(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("session_id", name="pk_stream_sessions"),
    )
    op.create_index("ix_stream_sessions_started_at", "stream_sessions", ["started_at"])
    op.create_index("ix_stream_sessions_ended_at", "stream_sessions", ["ended_at"])
    op.create_index("ix_stream_sessions_stream", "stream_sessions", ["stream_id", "started_at"])
    op.create_index("ix_stream_sessions_publisher", "stream_sessions", ["publisher_id", "started_at"])
    op.create_index("ix_stream_sessions_consumer", "stream_sessions", ["consumer_id", "started_at"])


def downgrade() -> None:
    op.drop_table("stream_sessions")
    op.drop_table("streams_advertised")
    op.drop_table("stream_types")
