"""Table definitions used by the queries (SQLAlchemy Core).

The migrations in ``migrations/versions`` create these tables; this module must describe
the same shape. ``UTCDateTime`` keeps timestamps timezone-aware UTC on every backend.
"""

from __future__ import annotations

from datetime import datetime, timezone
import sqlalchemy as sa
from sqlalchemy.engine import Dialect

# Partial-index condition: at most one open operation per resource.
OPEN_WHERE = "status IN ('accepted', 'dispatched')"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that refuses naive values and always returns aware UTC.

    SQLite has no timezone type: values are stored as naive UTC text (so that text order
    is time order) and tagged UTC again when read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the store needs timezone-aware values")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _json() -> sa.JSON:
    # none_as_null: Python None becomes SQL NULL, not the JSON literal 'null'.
    return sa.JSON(none_as_null=True)


metadata = sa.MetaData()

idempotency = sa.Table(
    "idempotency",
    metadata,
    sa.Column("action", sa.String(), nullable=False),
    sa.Column("target", sa.String(), nullable=False),
    sa.Column("idempotency_key", sa.String(), nullable=False),
    sa.Column("request_hash", sa.String(), nullable=False),
    sa.Column("correlation_id", sa.String(), nullable=False),
    sa.Column("envelope", _json(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("action", "target", "idempotency_key", name="pk_idempotency"),
    sa.Index("ix_idempotency_expires_at", "expires_at"),
    sa.Index("ix_idempotency_correlation_id", "correlation_id"),
)

operations = sa.Table(
    "operations",
    metadata,
    sa.Column("correlation_id", sa.String(), nullable=False),
    sa.Column("idempotency_key", sa.String(), nullable=False),
    sa.Column("action", sa.String(), nullable=False),
    sa.Column("target", sa.String(), nullable=False),
    sa.Column("signal", sa.String(), nullable=False),
    sa.Column("swarm_id", sa.String(), nullable=True),
    sa.Column("lifecycle", sa.Boolean(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("envelope", _json(), nullable=False),
    sa.Column("timeout_ms", sa.Integer(), nullable=False),
    sa.Column("deadline", UTCDateTime(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("outcome", _json(), nullable=True),
    # Set when this operation's begin inserted the swarm row (a create).
    sa.Column("creates_swarm", sa.Boolean(), nullable=False, server_default=sa.false()),
    # The signal bodies to publish: what the outbox sends again if the gateway died first.
    sa.Column("signals", _json(), nullable=True),
    # What the operation holds while open (swarm:<id>, ...); None: it holds nothing.
    sa.Column("resource", sa.String(), nullable=True),
    sa.PrimaryKeyConstraint("correlation_id", name="pk_operations"),
    sa.CheckConstraint(
        "status IN ('accepted', 'dispatched', 'succeeded', 'failed', 'timed_out')",
        name="ck_operations_status",
    ),
    sa.Index(
        "uq_operations_open_resource",
        "resource",
        unique=True,
        sqlite_where=sa.text(OPEN_WHERE),
        postgresql_where=sa.text(OPEN_WHERE),
    ),
    sa.Index("ix_operations_status_deadline", "status", "deadline"),
)

swarms = sa.Table(
    "swarms",
    metadata,
    sa.Column("id", sa.String(), nullable=False),
    sa.Column("template_id", sa.String(), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("controller_instance", sa.String(), nullable=True),
    sa.Column("health", sa.String(32), nullable=False, server_default="unknown"),
    sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
    sa.Column("bees", _json(), nullable=False),
    sa.Column("last_heartbeat", UTCDateTime(), nullable=True),
    sa.Column("last_error", _json(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_swarms"),
)


components = sa.Table(
    "components",
    metadata,
    sa.Column("role", sa.String(), nullable=False),
    sa.Column("instance", sa.String(), nullable=False),
    sa.Column("swarm_id", sa.String(), nullable=True),
    sa.Column("enabled", sa.Boolean(), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    # As the component's controller last saw its container: running, exited, missing...
    sa.Column("container_state", sa.String(32), nullable=True),
    sa.Column("totals", _json(), nullable=False),
    sa.Column("queue_stats", _json(), nullable=False),
    sa.Column("data", _json(), nullable=False),
    sa.Column("version", sa.String(16), nullable=True),
    sa.Column("first_seen", UTCDateTime(), nullable=False),
    # When the gateway last received a status from the component itself; None if never.
    sa.Column("last_seen", UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint("role", "instance", name="pk_components"),
    sa.Index("ix_components_swarm_id", "swarm_id"),
)

operation_targets = sa.Table(
    "operation_targets",
    metadata,
    sa.Column("correlation_id", sa.String(), nullable=False),
    sa.Column("target", sa.String(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("outcome", _json(), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("correlation_id", "target", name="pk_operation_targets"),
    sa.ForeignKeyConstraint(["correlation_id"], ["operations.correlation_id"], ondelete="CASCADE",
                            name="fk_operation_targets_operation"),
)

# The engine-pool surface's read models: engines as their pool controller last reported them,
# streams as callers reported them, and the statistics collected for each stream.
pool_engines = sa.Table(
    "pool_engines",
    metadata,
    sa.Column("pool_id", sa.String(), nullable=False),
    sa.Column("container_id", sa.String(), nullable=False),
    sa.Column("body", _json(), nullable=False),
    sa.PrimaryKeyConstraint("pool_id", "container_id", name="pk_pool_engines"),
)

pool_streams = sa.Table(
    "pool_streams",
    metadata,
    sa.Column("pool_id", sa.String(), nullable=False),
    sa.Column("id", sa.String(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("container_id", sa.String(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("ended_at", UTCDateTime(), nullable=True),
    sa.Column("body", _json(), nullable=False),
    sa.PrimaryKeyConstraint("pool_id", "id", name="pk_pool_streams"),
    sa.Index("ix_pool_streams_ended_at", "ended_at"),
)

pool_stream_stats = sa.Table(
    "pool_stream_stats",
    metadata,
    sa.Column("pool_id", sa.String(), nullable=False),
    sa.Column("stream_id", sa.String(), nullable=False),
    sa.Column("ts", UTCDateTime(), nullable=False),
    sa.Column("body", _json(), nullable=False),
    sa.Index("ix_pool_stream_stats_stream", "pool_id", "stream_id", "ts"),
    sa.Index("ix_pool_stream_stats_ts", "ts"),
)

# The streams registry's durable part: created stream types, the streams advertised now (read
# back after a restart; heartbeats stay in memory), and every session's history row.
stream_types = sa.Table(
    "stream_types",
    metadata,
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("body", _json(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("name", name="pk_stream_types"),
)

streams_advertised = sa.Table(
    "streams_advertised",
    metadata,
    sa.Column("id", sa.String(36), nullable=False),
    sa.Column("body", _json(), nullable=False),
    sa.Column("advertised_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_streams_advertised"),
)

stream_sessions = sa.Table(
    "stream_sessions",
    metadata,
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
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("ended_at", UTCDateTime(), nullable=True),
    sa.Column("duration_seconds", sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint("session_id", name="pk_stream_sessions"),
    sa.Index("ix_stream_sessions_started_at", "started_at"),
    sa.Index("ix_stream_sessions_ended_at", "ended_at"),
    sa.Index("ix_stream_sessions_stream", "stream_id", "started_at"),
    sa.Index("ix_stream_sessions_publisher", "publisher_id", "started_at"),
    sa.Index("ix_stream_sessions_consumer", "consumer_id", "started_at"),
)

# The services surface's webhooks: each subscription with the secret its deliveries are signed
# with, and each event queued for one of them. A delivery is unique per (webhook, event id), so
# several gateways that all see one event queue it once. ``lease`` names the gateway's claim
# that is sending it; ``next_attempt_at`` is when it is due (while claimed: when the claim
# lapses), null once it is delivered or failed.
webhooks = sa.Table(
    "webhooks",
    metadata,
    sa.Column("id", sa.String(36), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("events", _json(), nullable=False),
    sa.Column("secret", sa.String(256), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_webhooks"),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.String(36), nullable=False),
    sa.Column("webhook_id", sa.String(36), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("event_id", sa.String(255), nullable=False),
    sa.Column("body", sa.Text(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("last_status_code", sa.Integer(), nullable=True),
    sa.Column("last_error", sa.String(500), nullable=True),
    sa.Column("history", _json(), nullable=False),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
    sa.Column("lease", sa.String(100), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("delivered_at", UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
    sa.UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_event"),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_status"),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    sa.Index("ix_webhook_deliveries_webhook", "webhook_id", "created_at"),
    sa.Index("ix_webhook_deliveries_updated_at", "updated_at"),
)
