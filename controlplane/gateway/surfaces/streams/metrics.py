"""The streams registry's metrics, for whoever watches the gateway's /metrics."""

from prometheus_client import Counter, Gauge, Histogram

STREAMS = Gauge("cp_streams_advertised", "Streams advertised and alive in this gateway's registry")
SESSIONS = Gauge("cp_stream_sessions_active", "Stream sessions open in this gateway's registry")
HEARTBEATS = Counter("cp_stream_heartbeats", "Heartbeats taken by this gateway", ["kind"])
NEGOTIATIONS = Counter("cp_stream_negotiations", "Stream requests by how they ended", ["result"])
NEGOTIATION_SECONDS = Histogram("cp_stream_negotiation_seconds", "From a stream request to the publisher's answer",
                                buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
EXPIRED = Counter("cp_streams_expired", "Streams and sessions expired, counted by the gateway that announced it",
                  ["kind"])

for _kind in ("stream", "session"):
    HEARTBEATS.labels(_kind)
    EXPIRED.labels(_kind)
for _result in ("accepted", "rejected", "no-publisher", "timeout", "malformed", "gone"):
    NEGOTIATIONS.labels(_result)
