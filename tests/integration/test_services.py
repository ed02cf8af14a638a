"""The services dashboard surface against the real Docker engine and RabbitMQ: the read model
kept from the host controller's reports, actions through the owner, logs, stats, updates."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Awaitable
from typing import Any

import docker
import pytest
from standardwebhooks.webhooks import Webhook as Verifier

from controlplane.contract import keys
from tests.conftest import Stack, new_key, new_swarm_id, running_stack
from tests.webhook_receiver import Receiver, free_port, receiving

pytestmark = pytest.mark.asyncio(loop_scope="session")

BASE_IMAGE = "controlplane:local"
# A service that logs a line per level, then one a second; TERM ends it at once.
SERVICE_SCRIPT = (
    "import json, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "print('INFO service starting', flush=True)\n"
    "print('WARNING disk almost full', file=sys.stderr, flush=True)\n"
    "print(json.dumps({'level': 'error', 'msg': 'upstream refused'}), flush=True)\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    print(f'tick {n}', flush=True)\n"
    "    time.sleep(1)\n"
)


@pytest.fixture(scope="module")
def engine() -> Any:
    client = docker.from_env()
    yield client
    client.close()


def build_image(engine: Any, tag: str, version: str, cmd: list[str] | None = None, healthcheck: str | None = None) -> str:
    """A small image of ``tag`` whose OCI version label is ``version``; its id."""
    lines = [f"FROM {BASE_IMAGE}", f'LABEL org.opencontainers.image.version="{version}" '
             f'org.opencontainers.image.description="a test service" cp-test-build="{tag.rsplit(":", 1)[0]}"',
             "ENV SERVICE_MODE=image-default"]
    if cmd is not None:
        lines.append("CMD " + json.dumps(cmd))
    if healthcheck is not None:
        lines.append("HEALTHCHECK " + healthcheck)
    image, _ = engine.images.build(fileobj=io.BytesIO("\n".join(lines).encode()), tag=tag, rm=True)
    return str(image.id)


def remove_images(engine: Any, tag: str) -> None:
    """Every build of ``tag`` (its earlier ones are untagged by the later), by the label they share."""
    repository = tag.rsplit(":", 1)[0]
    for image in engine.images.list(filters={"label": f"cp-test-build={repository}"}):
        engine.images.remove(image.id, force=True)


@pytest.fixture
async def services(settings_factory: Callable[..., Any], runtime: Any) -> AsyncIterator[Stack]:
    settings = settings_factory(services_stats_interval_s=1.0, services_update_timeout_s=20.0)
    async with running_stack(settings, runtime) as stack:
        yield stack


@pytest.fixture
def containers(engine: Any) -> Any:
    made: list[Any] = []

    def run(name: str, image: str = BASE_IMAGE, start: bool = True, **kwargs: Any) -> Any:
        labels = {"controlplane.service": "true", **kwargs.pop("labels", {})}
        command = kwargs.pop("command", ["python", "-c", SERVICE_SCRIPT])
        if start:
            container = engine.containers.run(image, name=name, labels=labels, detach=True, command=command, **kwargs)
        else:
            container = engine.containers.create(image, name=name, labels=labels, command=command, **kwargs)
        made.append(name)
        return container

    yield run
    for name in made:
        for found in engine.containers.list(all=True, filters={"name": name}):
            found.remove(force=True)


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = "condition") -> Any:
    """``check()``'s first truthy value, polling within a bound."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s (last: {value!r})")
        await asyncio.sleep(0.2)


async def listed(stack: Stack, name: str, **where: Any) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        status, body = await stack.get("/api/services")
        assert status == 200, body
        return next((s for s in body["data"] if s["id"] == name
                     and all(s.get(k) == v for k, v in where.items())), None)

    return await until(find, what=f"service {name} listed with {where}")


def name_for(prefix: str) -> str:
    return f"svc-{prefix}-{uuid.uuid4().hex[:6]}"


async def test_an_opted_in_container_is_listed_with_details_and_stats(services: Stack, containers: Any,
                                                                       engine: Any) -> None:
    name = name_for("list")
    container = containers(name, labels={"org.opencontainers.image.version": "3.1.4",
                                         "controlplane.service.name": "Listing service"},
                           environment={"API_TOKEN": "s3cr3t-value", "MODE": "demo"}, mem_limit="256m",
                           ports={"8000/tcp": ("127.0.0.1", None)})
    found = await listed(services, name, status="running")
    assert found["containerId"] == container.id and found["name"] == "Listing service"
    assert found["version"] == "3.1.4" and found["health"] == "none" and found["stats"]["restartCount"] == 0
    container.reload()
    host_port = int(container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"])
    assert found["port"] == host_port and found["url"] == f"http://localhost:{host_port}"

    for ref in (container.id, container.id[:12], name):
        status, body = await services.get(f"/api/services/{ref}")
        assert status == 200 and body["success"] is True, body
        assert body["data"]["containerId"] == container.id
    details = body["data"]["details"]
    assert details["image"] == BASE_IMAGE and {"internal": 8000, "external": host_port, "protocol": "tcp"} in details["ports"]
    assert "API_TOKEN=***" in details["env"] and "MODE=***" in details["env"]  # values masked by default
    assert "s3cr3t-value" not in str(body)

    async def sampled() -> dict[str, Any] | None:
        _, stats = await services.get(f"/api/services/{name}/stats")
        return stats["data"] if stats["data"]["sampled"] else None

    stats = await until(sampled, what="a stats sample")
    docker_stats = container.stats(stream=False)
    assert stats["memoryLimit"] == docker_stats["memory_stats"]["limit"] == 256 * 1024 * 1024
    assert 0 < stats["memoryUsage"] <= docker_stats["memory_stats"]["usage"] * 2
    assert stats["memory"] == pytest.approx(stats["memoryUsage"] / stats["memoryLimit"] * 100, abs=0.01)
    assert stats["restartCount"] == container.attrs["RestartCount"] and stats["uptime"] >= 0

    status, system = await services.get("/api/system/stats")
    assert status == 200 and system["data"]["services"]["running"] >= 1
    assert system["data"]["resources"]["totalMemoryUsage"] >= stats["memoryUsage"]
    metrics = await (await services.client.get("/metrics")).text()
    running = next(line for line in metrics.splitlines() if line.startswith('cp_services{status="running"}'))
    assert float(running.split()[-1]) == system["data"]["services"]["running"]


async def test_start_stop_restart_act_on_the_container_and_answer_with_its_state(services: Stack, containers: Any,
                                                                                  engine: Any) -> None:
    name = name_for("act")
    container = containers(name)
    await listed(services, name, status="running")

    key = str(uuid.uuid4())
    status, body = await services.post(f"/api/services/{name}/stop", {}, headers={"Idempotency-Key": key})
    assert (status, body["data"]["status"]) == (200, "stopped"), body
    assert body["data"]["message"] == "Service stopped successfully"
    container.reload()
    assert container.status == "exited"
    # The same key again is the same request: answered again, nothing done twice.
    again_status, again = await services.post(f"/api/services/{name}/stop", {}, headers={"Idempotency-Key": key})
    assert again_status == 200 and again["data"] == body["data"]
    await listed(services, name, status="stopped")
    status, stopped = await services.get("/api/services?filter=stopped")
    assert name in [s["id"] for s in stopped["data"]]

    status, body = await services.post(f"/api/services/{container.id[:12]}/start", {})
    assert (status, body["data"]["status"]) == (200, "running"), body
    container.reload()
    started_at = container.attrs["State"]["StartedAt"]
    assert container.status == "running"

    status, body = await services.post(f"/api/services/{name}/restart", {})
    assert (status, body["data"]["status"]) == (200, "running"), body
    container.reload()
    assert container.status == "running" and container.attrs["State"]["StartedAt"] != started_at
    status, running = await services.get("/api/services?filter=running")
    assert name in [s["id"] for s in running["data"]]


async def test_logs_are_parsed_into_timestamp_message_and_level(services: Stack, containers: Any) -> None:
    name = name_for("logs")
    container = containers(name)
    await listed(services, name, status="running")

    async def ticked() -> bool:
        return b"tick 2" in container.logs()

    await until(ticked, what="two ticks logged")
    status, body = await services.get(f"/api/services/{name}/logs?lines=100")
    assert status == 200, body
    logs = body["data"]["logs"]
    by_message = {line["message"]: line for line in logs}
    assert by_message["INFO service starting"]["level"] == "info"
    assert by_message["WARNING disk almost full"]["level"] == "warning"
    assert by_message["WARNING disk almost full"]["stream"] == "stderr"
    assert by_message['{"level": "error", "msg": "upstream refused"}']["level"] == "error"
    assert all(line["timestamp"].endswith("Z") for line in logs)
    # Docker's own lines, in time order (its file may hold two streams' lines a little out of it).
    own = [line.split(" ", 1)[1] for line in sorted(container.logs(timestamps=True).decode().splitlines(),
                                                   key=lambda line: line.split(" ", 1)[0])]
    assert [line["message"] for line in logs] == own[:len(logs)]

    status, last = await services.get(f"/api/services/{name}/logs?lines=2")
    assert status == 200 and len(last["data"]["logs"]) == 2
    newest = last["data"]["logs"][-1]["timestamp"]
    status, later = await services.get(f"/api/services/{name}/logs", params={"since": newest})
    assert status == 200 and all(line["timestamp"] >= newest[:19] for line in later["data"]["logs"])


async def test_a_crash_is_reported_as_a_service_error(services: Stack, containers: Any, watch: Any) -> None:
    watcher = await watch(keys.ready_key(keys.SERVICE_REPORT, "*"))
    name = name_for("crash")
    containers(name, command=["python", "-c", "import time; time.sleep(2); raise SystemExit(3)"])

    def crashed(body: dict[str, Any]) -> bool:
        return any(t["event"] == "service:error" and t["name"] == name for t in body.get("transitions", []))

    report = await watcher.wait_for(keys.service_report_key(services.settings.instance_id), where=crashed)
    transition = next(t for t in report["transitions"] if t["name"] == name)
    assert transition["reason"] == "crashed" and transition["details"]["exitCode"] == 3
    found = await listed(services, name, status="stopped")
    status, system = await services.get("/api/system/stats")
    assert system["data"]["health"]["errors"] >= 1 and system["data"]["health"]["status"] == "unhealthy"
    assert found["state"] == "exited"


async def test_update_recreates_the_container_with_its_config_on_the_rebuilt_image(
        services: Stack, containers: Any, engine: Any) -> None:
    tag = f"cp-svc-test-{uuid.uuid4().hex[:6]}:latest"
    name = name_for("upd")
    network = engine.networks.create(f"net-{name}")
    volume = engine.volumes.create(f"vol-{name}")
    try:
        old_image = build_image(engine, tag, "1.0.0")
        container = containers(name, image=tag, environment={"CUSTOM": "kept"}, labels={"team": "blue"},
                               ports={"8000/tcp": ("127.0.0.1", None)}, restart_policy={"Name": "on-failure",
                                                                                      "MaximumRetryCount": 3},
                               volumes={volume.name: {"bind": "/data", "mode": "rw"}}, network=network.name)
        container.reload()
        before = container.attrs
        found = await listed(services, name, version="1.0.0")

        new_image = build_image(engine, tag, "2.0.0")
        key = {"Idempotency-Key": str(uuid.uuid4())}
        status, body = await services.post(f"/api/services/{found['containerId']}/update", {}, headers=key)
        assert status == 200, body
        # A retry (by the name: the container is new) is answered again, nothing recreated twice.
        again_status, again = await services.post(f"/api/services/{name}/update", {}, headers=key)
        assert (again_status, again["data"]) == (200, body["data"])
        data = body["data"]
        assert (data["version"], data["versionBefore"], data["updated"]) == ("2.0.0", "1.0.0", True)
        assert data["message"] == "Service updated successfully" and data["pulled"] is False

        after = engine.containers.get(name).attrs
        assert after["Id"] != before["Id"] and after["Image"] == new_image != old_image
        assert after["State"]["Status"] == "running"
        assert "CUSTOM=kept" in after["Config"]["Env"] and after["Config"]["Labels"]["team"] == "blue"
        assert after["Config"]["Labels"]["org.opencontainers.image.version"] == "2.0.0"
        assert after["HostConfig"]["PortBindings"] == before["HostConfig"]["PortBindings"]
        assert after["HostConfig"]["RestartPolicy"] == before["HostConfig"]["RestartPolicy"]
        assert [(m["Name"], m["Destination"]) for m in after["Mounts"]] == [(volume.name, "/data")]
        assert network.name in after["NetworkSettings"]["Networks"]
        assert not engine.containers.list(all=True, filters={"id": before["Id"]})
        await listed(services, name, version="2.0.0", containerId=after["Id"])
    finally:
        for c in engine.containers.list(all=True, filters={"name": name}):
            c.remove(force=True)
        network.remove()
        volume.remove(force=True)
        remove_images(engine, tag)


REGISTRY = "127.0.0.1:5000"  # scripts/ensure-registry.sh


async def test_update_pulls_the_newest_image_when_a_registry_answers(services: Stack, containers: Any,
                                                                      engine: Any) -> None:
    ref = f"{REGISTRY}/cp-svc-test-{uuid.uuid4().hex[:6]}:latest"
    name = name_for("pull")
    try:
        old_image = build_image(engine, ref, "1.0.0", cmd=["python", "-c", SERVICE_SCRIPT])
        new_image = build_image(engine, ref, "2.0.0", cmd=["python", "-c", SERVICE_SCRIPT])
        engine.images.push(ref)  # the registry has 2.0.0 ...
        engine.images.get(old_image).tag(ref)  # ... while this engine's own tag says 1.0.0
        containers(name, image=ref, command=None)
        await listed(services, name, version="1.0.0", status="running")

        status, body = await services.post(f"/api/services/{name}/update", {})
        assert status == 200, body
        assert (body["data"]["pulled"], body["data"]["version"], body["data"]["versionBefore"]) == (True, "2.0.0", "1.0.0")
        assert engine.containers.get(name).attrs["Image"] == new_image
    finally:
        for c in engine.containers.list(all=True, filters={"name": name}):
            c.remove(force=True)
        remove_images(engine, ref)


@pytest.mark.parametrize("broken, why", [
    ({"cmd": ["python", "-c", "raise SystemExit(7)"]}, "exited with code 7"),
    ({"cmd": ["python", "-c", SERVICE_SCRIPT],
      "healthcheck": '--interval=1s --timeout=2s --retries=1 CMD ["python", "-c", "raise SystemExit(1)"]'},
     "health check failed"),
], ids=["exits", "unhealthy"])
async def test_an_update_whose_new_container_fails_is_rolled_back(services: Stack, containers: Any, engine: Any,
                                                                    broken: dict[str, Any], why: str) -> None:
    tag = f"cp-svc-test-{uuid.uuid4().hex[:6]}:latest"
    name = name_for("rbk")
    try:
        old_image = build_image(engine, tag, "1.0.0", cmd=["python", "-c", SERVICE_SCRIPT])
        container = containers(name, image=tag, command=None)
        await listed(services, name, version="1.0.0", status="running")
        build_image(engine, tag, "2.0.0-broken", **broken)

        status, body = await services.post(f"/api/services/{name}/update", {})
        assert (status, body["success"], body["code"]) == (502, False, "update-failed"), body
        assert body["rolledBack"] is True and body["versionBefore"] == "1.0.0" and why in body["error"]
        back = engine.containers.get(name)
        assert back.id == container.id and back.attrs["Image"] == old_image and back.status == "running"
        assert [c.name for c in engine.containers.list(all=True, filters={"name": name})] == [name]
    finally:
        for c in engine.containers.list(all=True, filters={"name": name}):
            c.remove(force=True)
        remove_images(engine, tag)


async def test_an_update_recreates_only_what_the_policy_allows(services: Stack, containers: Any, engine: Any) -> None:
    name = name_for("host")
    container = containers(name, volumes={"/tmp": {"bind": "/host-tmp", "mode": "ro"}})  # a host mount nobody allowed
    await listed(services, name, status="running")
    status, body = await services.post(f"/api/services/{name}/update", {})
    assert (status, body["code"]) == (403, "policy-refused"), body
    assert "'/tmp'" in body["error"] and "CP_ALLOWED_MOUNTS" in body["error"]
    assert engine.containers.get(name).id == container.id


@pytest.mark.parametrize("path, field", [
    ("/api/services?filter=sleeping", "filter"),
    ("/api/services?limit=0", "limit"),
    ("/api/services?page=abc", "page"),
])
async def test_bad_queries_are_400_in_the_envelope(services: Stack, path: str, field: str) -> None:
    status, body = await services.get(path)
    assert status == 400 and body["success"] is False and body["fields"][0]["field"] == field, body
    assert isinstance(body["error"], str) and field in body["error"]


async def test_unknown_services_and_bad_parameters_are_4xx_in_the_envelope(services: Stack, containers: Any) -> None:
    for path in ("/api/services/no-such-service", "/api/services/no-such-service/stats",
                 "/api/services/no-such-service/logs"):
        status, body = await services.get(path)
        assert status == 404 and body == {"success": False, "error": body["error"], "code": "not-found",
                                          "fields": [{"field": "containerId", "reason": "unknown"}]}, body
    status, body = await services.post("/api/services/no-such-service/stop", {})
    assert status == 404 and body["success"] is False

    name = name_for("bad")
    containers(name)
    await listed(services, name)
    for query, field in (("lines=0", "lines"), ("lines=x", "lines"), ("since=yesterday", "since")):
        status, body = await services.get(f"/api/services/{name}/logs?{query}")
        assert status == 400 and body["fields"][0]["field"] == field, body
    status, body = await services.post(f"/api/services/{name}/stop", {}, headers={"Idempotency-Key": "not-a-uuid"})
    assert status == 400 and body["success"] is False and body["fields"][0]["field"] == "idempotency_key", body


async def test_a_swarms_container_is_acted_on_by_its_swarm_controller(services: Stack, watch: Any,
                                                                      engine: Any) -> None:
    swarm_id = new_swarm_id("svc")
    watcher = await watch(f"ev.*.*.{swarm_id}")
    status, created = await services.post(f"/api/swarms/{swarm_id}/create",
                                          {"idempotencyKey": new_key(), "templateId": "generator-demo"})
    assert status == 202, created
    await watcher.wait_for(f"ev.ready.swarm-create.{swarm_id}", 120)
    try:
        async def ready() -> bool:  # the gateway routes to a swarm's controller once it knows the swarm serves
            status, swarm = await services.get(f"/api/swarms/{swarm_id}")
            return status == 200 and swarm["status"] == "Ready"

        await until(ready, what="the swarm Ready in the gateway's read model")
        async def a_bee() -> dict[str, Any] | None:
            _, body = await services.get("/api/services?filter=running")
            return next((s for s in body["data"] if s["swarmId"] == swarm_id and s["kind"] == "bee"), None)

        bee = await until(a_bee, timeout=60, what="a bee of the swarm listed")
        status, body = await services.post(f"/api/services/{bee['id']}/stop", {})
        assert (status, body["data"]["status"]) == (200, "stopped"), body
        # Answered by the swarm's controller, on the swarm's own topic.
        outcome = await watcher.wait_for(f"ev.ready.service-stop.{swarm_id}", 10)
        assert outcome["details"]["containerId"] == bee["containerId"]
        assert engine.containers.get(bee["containerId"]).status == "exited"
        status, body = await services.post(f"/api/services/{bee['id']}/start", {})
        assert (status, body["data"]["status"]) == (200, "running"), body
    finally:
        await services.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()})
        await watcher.wait_for(f"ev.ready.swarm-remove.{swarm_id}", 120)


async def test_webhooks_get_signed_service_events_from_real_containers(settings_factory: Callable[..., Any],
                                                                      runtime: Any, containers: Any,
                                                                      engine: Any) -> None:
    settings = settings_factory(webhook_allowed_targets=["127.0.0.1"], webhook_retry_base_s=0.2,
                                webhook_retry_max_s=1.0)
    secret = "a-secret-the-receiver-shares"
    async with running_stack(settings, runtime) as stack, receiving(Receiver(free_port())) as receiver:
        status, hook = await stack.post("/api/webhooks", {"url": receiver.url, "secret": secret,
                                                          "events": ["service:error", "service:stop",
                                                                     "service:restart", "service:update"]})
        assert status == 201, hook
        name = name_for("hook")
        container = containers(name, command=["python", "-c", "import time; time.sleep(1); raise SystemExit(5)"])

        def of_name(event: str, service: str) -> Callable[[list[Any]], bool]:
            return lambda seen: any(r.json["type"] == event and r.json["data"]["name"] == service for r in seen)

        seen = await receiver.wait_for(of_name("service:error", name))
        call = next(r for r in seen if r.json["data"]["name"] == name)
        Verifier(secret.encode()).verify(call.body, call.headers)  # Standard Webhooks, as a receiver checks it
        expected = base64.b64encode(hmac.new(secret.encode(), f"{call.headers['webhook-id']}."
                                             f"{call.headers['webhook-timestamp']}.".encode() + call.body,
                                             hashlib.sha256).digest()).decode()
        assert call.headers["webhook-signature"] == f"v1,{expected}"
        assert call.json["data"]["reason"] == "crashed" and call.json["data"]["exitCode"] == 5
        assert call.json["data"]["containerId"] == container.id
        # service:start is not subscribed: none came, though the container started before it crashed.
        assert all(r.json["type"] != "service:start" for r in seen)

        # A failed action is a service:error too: a start whose command does not exist.
        broken = name_for("hook-broken")
        containers(broken, command=["/no/such/program"], start=False)
        await listed(stack, broken, status="stopped")
        status, body = await stack.post(f"/api/services/{broken}/start", {})
        assert (status, body["code"]) == (502, "start-failed"), body
        failed = await receiver.wait_for(of_name("service:error", broken))
        assert next(r for r in failed if r.json["data"]["name"] == broken).json["data"]["reason"] == "action-failed"
        # A stop asked through the API is service:stop, not an error.
        other = name_for("hook-stop")
        containers(other)
        await listed(stack, other, status="running")

        async def sampled() -> bool:  # at once, though this stack's sampler goes round every 10 minutes
            _, stats = await stack.get(f"/api/services/{other}/stats")
            return bool(stats["data"]["sampled"])

        await until(sampled, what="a container just started read at once")
        status, body = await stack.post(f"/api/services/{other}/stop", {})
        assert status == 200, body
        stopped = await receiver.wait_for(lambda seen: any(
            r.json["type"] == "service:stop" and r.json["data"]["name"] == other for r in seen))
        assert not any(r.json["type"] == "service:error" and r.json["data"]["name"] == other for r in stopped)
        # A restart, and an update with its versions.
        updated, tag = name_for("hook-upd"), f"cp-svc-test-{uuid.uuid4().hex[:6]}:latest"
        try:
            build_image(engine, tag, "1.0.0", cmd=["python", "-c", SERVICE_SCRIPT])
            containers(updated, image=tag, command=None)
            await listed(stack, updated, status="running")
            status, body = await stack.post(f"/api/services/{updated}/restart", {})
            assert status == 200, body
            await receiver.wait_for(of_name("service:restart", updated))
            build_image(engine, tag, "1.1.0", cmd=["python", "-c", SERVICE_SCRIPT])
            status, body = await stack.post(f"/api/services/{updated}/update", {})
            assert status == 200, body
            seen = await receiver.wait_for(of_name("service:update", updated))
            update = next(r.json["data"] for r in seen if r.json["type"] == "service:update")
            assert (update["version"], update["versionBefore"]) == ("1.1.0", "1.0.0")
            assert update["correlationId"] and update["previousContainerId"] != body["data"]["containerId"]
        finally:
            for c in engine.containers.list(all=True, filters={"name": updated}):
                c.remove(force=True)
            remove_images(engine, tag)
        status, deliveries = await stack.get(f"/api/webhooks/{hook['data']['id']}/deliveries")
        assert status == 200 and {d["status"] for d in deliveries["data"]} <= {"delivered", "pending"}
