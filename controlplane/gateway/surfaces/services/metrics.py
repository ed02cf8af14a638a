"""The services dashboard's metrics, for whoever watches the gateway's /metrics."""

from prometheus_client import Counter, Gauge

SERVICES = Gauge("cp_services", "Services in this gateway's read model, by status", ["status"])
UNHEALTHY = Gauge("cp_services_unhealthy", "Services whose health check says unhealthy")
REPORTS = Counter("cp_service_reports", "Host controllers' service reports applied", ["kind"])
TRANSITIONS = Counter("cp_service_transitions", "What happened to services, as the host controllers reported it",
                      ["event"])
ACTIONS = Counter("cp_service_actions", "Service actions answered, by action and result", ["action", "result"])

for _kind in ("full", "changes", "samples"):
    REPORTS.labels(_kind)
for _event in ("service:start", "service:stop", "service:restart", "service:error"):
    TRANSITIONS.labels(_event)
