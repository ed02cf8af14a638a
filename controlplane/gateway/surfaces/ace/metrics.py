"""The metrics the engine-pool document names, exactly so named."""

from prometheus_client import Counter, Gauge

EVENTS_STARTED = Counter("orch_events_started", "Streams started, as callers reported them (repeats not counted)")
EVENTS_ENDED = Counter("orch_events_ended", "Streams ended, as callers reported them (repeats not counted)")
COLLECT_ERRORS = Counter("orch_collect_errors", "Stream statistics the collector could not read")
STREAMS_ACTIVE = Gauge("orch_streams_active", "Streams started and not yet ended")
PROVISIONS = Counter("orch_provision", "Engines provisioned", ["kind"])

for _kind in ("generic", "acestream"):
    PROVISIONS.labels(_kind)  # listed at 0 before the first provision
