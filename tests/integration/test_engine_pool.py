"""The engine-pool surface (/ace) against the real RabbitMQ and Docker engine, with fake engines.

Engines run ``controlplane-fake-engine:local`` (docker/fake-engine): an HTTP server that
answers an AceStream engine's status, network and stat calls on the port its CONF names, with
switches (``POST /_fake/mode``) to make it unhealthy, slow or forgetful.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from controlplane.config import Settings
from controlplane.runtime.docker import DockerRuntime
from controlplane.runtime.labels import filter_for
from tests.conftest import OWNER, Stack, running_stack

pytestmark = pytest.mark.integration

FAKE_ENGINE = "controlplane-fake-engine:local"
# Each test's pool gets host ports of its own, so engines left by one never collide with the next.
_port_blocks = itertools.count(0)


def pool_settings(settings_factory: Callable[..., Settings], **pool: Any) -> Settings:
    first = 19100 + 40 * next(_port_blocks)
    overrides: dict[str, Any] = {
        "hostPorts": f"{first}-{first + 39}", "health": {"intervalS": 0.3, "failures": 2, "timeoutS": 1},
        "statsIntervalS": 0.3, "idleGraceS": 3600, "startupTimeoutS": 15, **pool}
    return settings_factory(ace_pool_id=f"p{uuid.uuid4().hex[:6]}", ace_image=FAKE_ENGINE, ace_pool=overrides)


async def until(probe: Callable[[], Awaitable[Any]], timeout: float = 20, what: str = "condition") -> Any:
    """Poll ``probe`` until it returns something truthy, at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def pool_stack(settings: Settings, runtime: DockerRuntime, keep: bool = False) -> AsyncIterator[Stack]:
    """A control plane serving the pool, once its controller serves; its engines removed after
    unless ``keep`` (stopping the control plane itself removes nothing)."""
    try:
        async with running_stack(settings, runtime) as stack:
            async def ready() -> bool:
                status, swarm = await stack.get(f"/api/swarms/{settings.ace_pool_id}")
                return status == 200 and swarm["status"] == "Running"

            await until(ready, 60, "the pool's controller")
            yield stack
    finally:
        for info in [] if keep else await runtime.list(filter_for(swarm_id=settings.ace_pool_id, owner=OWNER)):
            await runtime.remove(info.id)


async def engines(stack: Stack) -> list[dict[str, Any]]:
    status, body = await stack.get("/ace/engines")
    assert status == 200, body
    return body


async def engine(stack: Stack, container_id: str) -> dict[str, Any] | None:
    return next((e for e in await engines(stack) if e["container_id"] == container_id), None)


async def fake(port: int, **mode: Any) -> dict[str, Any]:
    """Read (and with ``mode``, change) a fake engine's switches through its published port."""
    async with aiohttp.ClientSession() as http:
        if mode:
            async with http.post(f"http://127.0.0.1:{port}/_fake/mode", json=mode) as resp:
                assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{port}/_fake/mode") as resp:
            return await resp.json()


async def _mode_when_up(port: int) -> dict[str, Any] | None:
    try:
        return await fake(port)
    except aiohttp.ClientError:
        return None


def started_event(provisioned: dict[str, Any], stream_id: str, session: str = "s1") -> dict[str, Any]:
    port = provisioned["host_http_port"]
    base = f"http://127.0.0.1:{port}/ace"
    return {"container_id": provisioned["container_id"], "engine": {"host": "127.0.0.1", "port": port},
            "stream": {"key_type": "infohash", "key": "0a48" * 10},
            "session": {"playback_session_id": session, "stat_url": f"{base}/stat/0a48/{session}",
                        "command_url": f"{base}/cmd/0a48/{session}", "is_live": 1},
            "labels": {"stream_id": stream_id}}


def iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0), value
    return parsed


async def test_engine_lifecycle_provision_stream_stats_end_delete(settings_factory: Callable[..., Settings],
                                                                  runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory)
    async with pool_stack(settings, runtime) as stack:
        status, made = await stack.post("/ace/provision/acestream", {"labels": {"stream_id": "ch-42"},
                                                                     "env": {"EXTRA_ENV": "X"}})
        assert status == 200, made
        assert set(made) == {"container_id", "container_name", "host_http_port", "container_http_port",
                             "container_https_port"}
        assert 40000 <= made["container_http_port"] <= 44999 and 45000 <= made["container_https_port"] <= 49999
        assert made["container_http_port"] != made["container_https_port"]
        # Listed by the time the provision answered, with every field of both documents.
        listed = await engine(stack, made["container_id"])
        assert listed is not None and listed["port"] == made["host_http_port"] and listed["host"] == "127.0.0.1"
        assert set(listed) == {"container_id", "container_name", "host", "port", "labels", "first_seen", "last_seen",
                               "streams", "health_status", "last_health_check", "last_stream_usage",
                               "last_cache_cleanup", "cache_size_bytes"}
        assert listed["labels"]["stream_id"] == "ch-42" and listed["labels"]["host.http_port"] == str(made["host_http_port"])
        iso(listed["first_seen"])

        async def healthy() -> dict[str, Any] | None:
            found = await engine(stack, made["container_id"])
            return found if found and found["health_status"] == "healthy" else None

        checked = await until(healthy, 20, "the engine's first healthy probe")
        iso(checked["last_health_check"])
        # The engine got the CONF built for its ports, and the caller's extra variable.
        mode = await fake(made["host_http_port"])
        assert mode["port"] == made["container_http_port"] and mode["https_port"] == made["container_https_port"]
        assert mode["conf"] == (f"--http-port={made['container_http_port']}\n"
                                f"--https-port={made['container_https_port']}\n--bind-all")
        assert mode["env_extra"] == {"EXTRA_ENV": "X"}

        event = started_event(made, "ch-42")
        status, stream = await stack.post("/ace/events/stream_started", event)
        assert status == 200, stream
        assert stream["id"] == "ch-42" and stream["status"] == "started" and stream["is_live"] is True
        assert stream["container_id"] == made["container_id"] and stream["ended_at"] is None
        iso(stream["started_at"])
        status, again = await stack.post("/ace/events/stream_started", event)
        assert status == 200 and again == stream  # a repeat changes nothing
        status, one = await stack.get(f"/ace/engines/{made['container_id'][:12]}")
        assert status == 200 and one["engine"]["streams"] == ["ch-42"] and [s["id"] for s in one["streams"]] == ["ch-42"]
        status, started = await stack.get(f"/ace/streams?status=started&container_id={made['container_id']}")
        assert status == 200 and [s["id"] for s in started] == ["ch-42"]

        async def stats() -> list[dict[str, Any]]:
            status, body = await stack.get("/ace/streams/ch-42/stats")
            assert status == 200, body
            return body

        snapshots = await until(stats, 20, "statistics of the stream")
        assert set(snapshots[0]) == {"ts", "peers", "speed_down", "speed_up", "downloaded", "uploaded", "status"}
        assert snapshots[0]["status"] == "dl" and isinstance(snapshots[0]["peers"], int)
        first_ts = iso(snapshots[0]["ts"])
        naive = (first_ts + timedelta(seconds=3600)).replace(tzinfo=None).isoformat()
        status, later = await stack.get("/ace/streams/ch-42/stats", params={"since": naive})
        assert status == 200 and later == []  # a time without zone is UTC: an hour ahead, nothing yet
        status, body = await stack.get("/ace/streams/ch-42/stats", params={"since": "yesterday"})
        assert status == 400 and body["fields"][0]["field"] == "since"
        status, body = await stack.get("/ace/streams/nope/stats")
        assert status == 404

        status, ended = await stack.post("/ace/events/stream_ended", {"container_id": made["container_id"],
                                                                      "stream_id": "ch-42", "reason": "player_stopped"})
        assert status == 200 and ended["updated"] is True and ended["stream"]["status"] == "ended"
        iso(ended["stream"]["ended_at"])
        status, repeat = await stack.post("/ace/events/stream_ended", {"stream_id": "ch-42"})
        assert status == 200 and repeat["updated"] is False and repeat["stream"]["status"] == "ended"
        status, unknown = await stack.post("/ace/events/stream_ended", {"container_id": made["container_id"]})
        assert status == 200 and unknown["updated"] is False and unknown["stream"] is None

        metrics = await (await stack.client.get("/ace/metrics")).text()
        for name in ("orch_events_started_total", "orch_events_ended_total", "orch_collect_errors_total",
                     "orch_streams_active", 'orch_provision_total{kind="acestream"}', 'orch_provision_total{kind="generic"}'):
            assert name in metrics, name

        status, inspected = await stack.get(f"/ace/containers/{made['container_id']}")
        assert status == 200 and inspected["Id"] == made["container_id"]
        assert all(item.endswith("=***") for item in inspected["Config"]["Env"])  # values never leave
        status, labelled = await stack.get("/ace/by-label", params={"key": "stream_id", "value": "ch-42"})
        assert status == 200 and [c["Id"] for c in labelled] == [made["container_id"]]

        response = await stack.client.delete(f"/ace/containers/{made['container_id']}")
        assert response.status == 200 and (await response.json()) == {"deleted": made["container_id"]}
        assert await engine(stack, made["container_id"]) is None
        assert await runtime.get(made["container_id"]) is None
        status, body = await stack.get(f"/ace/engines/{made['container_id']}")
        assert status == 404
        status, body = await stack.get(f"/ace/containers/{made['container_id']}")
        assert status == 404
        response = await stack.client.delete(f"/ace/containers/{made['container_id']}")
        assert response.status == 404


async def test_concurrent_provisions_never_share_a_port_and_a_full_pool_says_when_to_retry(
        settings_factory: Callable[..., Settings], runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory, maxReplicas=3)
    async with pool_stack(settings, runtime) as stack:
        answers = await asyncio.gather(*(stack.client.post("/ace/provision/acestream", json={}) for _ in range(5)))
        bodies = [(r.status, await r.json()) for r in answers]
        made = [b for s, b in bodies if s == 200]
        refused = [(r, b) for r, (s, b) in zip(answers, bodies) if s == 503]
        assert len(made) == 3 and len(refused) == 2, bodies
        for key in ("container_id", "container_name", "host_http_port", "container_http_port", "container_https_port"):
            assert len({m[key] for m in made}) == 3, key
        for response, body in refused:
            assert body["error"] == "pool-full" and body["retryable"] is True and body["retryAfterS"] > 0
            assert response.headers["Retry-After"] == str(body["retryAfterS"]) and body["operationId"]
        assert {e["container_id"] for e in await engines(stack)} == {m["container_id"] for m in made}


async def test_generic_provision_and_bad_requests(settings_factory: Callable[..., Settings],
                                                  runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory)
    first_port = int(settings.ace_pool["hostPorts"].split("-")[0])
    async with pool_stack(settings, runtime) as stack:
        status, made = await stack.post("/ace/provision", {"image": FAKE_ENGINE, "env": {"HTTP_PORT": "8080"},
                                                           "labels": {"role": "extra"}, "ports": {"8080/tcp": first_port}})
        assert status == 200 and set(made) == {"container_id"}, made
        listed = await engine(stack, made["container_id"])
        assert listed is not None and listed["port"] == first_port and listed["labels"]["role"] == "extra"
        # Answered once the container runs: a generic engine has no probe of its own to wait for.
        assert (await until(lambda: _mode_when_up(first_port), 10, "the generic engine's port"))["port"] == 8080
        # The same host port again: taken by the first engine.
        status, body = await stack.post("/ace/provision", {"image": FAKE_ENGINE, "ports": {"8080/tcp": first_port}})
        assert status == 409 and body["error"] == "port-taken", body
        status, body = await stack.post("/ace/provision", {"image": "alpine:latest"})
        assert status == 422 and body["error"] == "image-not-allowed" and body["fields"][0]["field"] == "image"
        status, body = await stack.post("/ace/provision", {"image": FAKE_ENGINE, "labels": {"controlplane.kind": "x"}})
        assert status == 400 and body["fields"][0]["field"] == "labels"
        status, body = await stack.post("/ace/provision/acestream", {"host_port": 70000})
        assert status == 400 and body["fields"][0]["field"] == "host_port"
        status, body = await stack.post("/ace/provision/acestream", "{not json")
        assert status == 400 and body["error"] == "malformed-json"
        status, body = await stack.post("/ace/events/stream_started", {"engine": {"host": "127.0.0.1", "port": 1}})
        assert status == 400 and {f["field"] for f in body["fields"]} >= {"stream", "session"}
        status, body = await stack.get("/ace/streams", params={"status": "paused"})
        assert status == 422 and body["fields"][0]["field"] == "status"
        status, body = await stack.get("/ace/by-label", params={"key": "role"})
        assert status == 400
        response = await stack.client.post("/ace/scale/many")
        assert response.status == 400 and (await response.json())["fields"][0]["field"] == "demand"
        status, body = await stack.get("/ace/vpn/status")
        assert status == 200 and body["enabled"] is False and body["status"] == "disabled"


async def test_scale_is_clamped_and_idle_engines_are_collected_above_the_minimum(
        settings_factory: Callable[..., Settings], runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory, minReplicas=1, maxReplicas=3, idleGraceS=4)
    async with pool_stack(settings, runtime) as stack:
        await until(lambda: _count(stack, 1), 30, "the pool's minimum of one engine")
        response = await stack.client.post("/ace/scale/10")
        body = await response.json()
        assert response.status == 200 and body["requested"] == 10 and body["applied"] == 3, body
        assert body["scaled_to"] == 3 and len(await engines(stack)) == 3
        busy = (await engines(stack))[-1]
        status, _ = await stack.post("/ace/events/stream_started", started_event(
            {"container_id": busy["container_id"], "host_http_port": busy["port"]}, "kept"))
        assert status == 200
        # Within the grace period nothing is collected, whoever asks.
        response = await stack.client.post("/ace/gc")
        body = await response.json()
        assert response.status == 200 and body["removed"] == [] and len(await engines(stack)) == 3, body
        # After it, idle engines go down to the minimum; the one playing stays.
        remaining = await until(lambda: _count(stack, 1), 30, "idle engines collected")
        assert remaining[0]["container_id"] == busy["container_id"]
        response = await stack.client.post("/ace/scale/0")
        body = await response.json()
        assert response.status == 200 and body["applied"] == 1 and len(await engines(stack)) == 1, body


async def _count(stack: Stack, wanted: int) -> list[dict[str, Any]] | None:
    found = await engines(stack)
    return found if len(found) == wanted else None


async def test_an_engine_that_fails_its_probe_is_replaced(settings_factory: Callable[..., Settings],
                                                          runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory, replaceCooldownS=0)
    async with pool_stack(settings, runtime) as stack:
        status, made = await stack.post("/ace/provision/acestream", {"labels": {"stream_id": "ch-7"}})
        assert status == 200, made

        async def health_of(container_id: str, wanted: str) -> bool:
            found = await engine(stack, container_id)
            return found is not None and found["health_status"] == wanted

        await until(lambda: health_of(made["container_id"], "healthy"), 20, "healthy")
        await fake(made["host_http_port"], healthy=False)

        async def replaced() -> list[dict[str, Any]] | None:
            found = await engines(stack)
            others = [e for e in found if e["container_id"] != made["container_id"]]
            gone = all(e["container_id"] != made["container_id"] for e in found)
            return others if gone and len(others) == 1 and others[0]["health_status"] == "healthy" else None

        successor = (await until(replaced, 40, "the unhealthy engine's replacement"))[0]
        assert successor["labels"]["stream_id"] == "ch-7"  # made from the same request
        assert await runtime.get(made["container_id"]) is None


async def test_idle_engines_get_their_cache_cleaned(settings_factory: Callable[..., Settings],
                                                    runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory, cache={"idleS": 0.5})
    async with pool_stack(settings, runtime) as stack:
        status, made = await stack.post("/ace/provision/acestream", {})
        assert status == 200, made

        async def cleaned() -> dict[str, Any] | None:
            found = await engine(stack, made["container_id"])
            return found if found and found["last_cache_cleanup"] else None

        found = await until(cleaned, 20, "the cache clean-up")
        assert found["cache_size_bytes"] > 0
        iso(found["last_cache_cleanup"])


async def test_a_restart_keeps_engines_ports_streams_and_their_history(settings_factory: Callable[..., Settings],
                                                                       runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory)
    async with pool_stack(settings, runtime, keep=True) as stack:
        status, made = await stack.post("/ace/provision/acestream", {})
        assert status == 200, made
        status, _ = await stack.post("/ace/events/stream_started", started_event(made, "kept"))
        assert status == 200
        status, _ = await stack.post("/ace/events/stream_started", started_event(made, "over", "s2"))
        assert status == 200
        status, _ = await stack.post("/ace/events/stream_ended", {"stream_id": "over"})
        assert status == 200

        async def collected() -> list[dict[str, Any]]:
            return (await stack.get("/ace/streams/kept/stats"))[1]

        before = await until(collected, 20, "statistics before the restart")
    # The first control plane has stopped, destroying nothing; the next serves the same pool.
    assert await runtime.get(made["container_id"]) is not None
    async with pool_stack(settings, runtime) as again:
        listed = await until(lambda: _count(again, 1), 30, "the engine after the restart")
        assert listed[0]["container_id"] == made["container_id"] and listed[0]["port"] == made["host_http_port"]
        assert listed[0]["streams"] == ["kept"]
        status, streams = await again.get("/ace/streams")
        assert status == 200 and {s["id"]: s["status"] for s in streams} == {"kept": "started", "over": "ended"}
        status, history = await again.get("/ace/streams/kept/stats")
        assert status == 200 and history[: len(before)] == before
        # The restarted pool knows its ports: a new engine gets others.
        status, second = await again.post("/ace/provision/acestream", {})
        assert status == 200, second
        assert second["host_http_port"] != made["host_http_port"]
        assert second["container_http_port"] != made["container_http_port"]
        # The restarted controller remembers the stream: the engine playing it is not idle.
        response = await again.client.post("/ace/scale/0")
        body = await response.json()
        assert response.status == 200 and body["removed"] == [second["container_id"]], body
        assert await runtime.get(made["container_id"]) is not None


FAKE_VPN = "controlplane-fake-vpn:local"


@asynccontextmanager
async def vpn_container(runtime: DockerRuntime) -> AsyncIterator[tuple[str, str]]:
    """A Gluetun stand-in the operator runs (not the control plane): (its name, its control URL)."""
    name = f"cp-test-vpn-{uuid.uuid4().hex[:6]}"
    proc = await asyncio.create_subprocess_exec("docker", "run", "-d", "--name", name, "-e", "FAKE_FORWARDED_PORT=12345",
                                                FAKE_VPN, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    try:
        document = await runtime.inspect(name)
        assert document is not None
        address = next(n["IPAddress"] for n in document["NetworkSettings"]["Networks"].values() if n["IPAddress"])
        yield name, f"http://{address}:8000"
    finally:
        await runtime.remove(name)


async def switch_vpn(control: str, healthy: bool) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{control}/_fake/health", json={"healthy": healthy}) as resp:
            assert resp.status == 200


async def test_vpn_status_follows_docker_health_and_the_engines_double_check(
        settings_factory: Callable[..., Settings], runtime: DockerRuntime) -> None:
    async with vpn_container(runtime) as (name, control):
        settings = pool_settings(settings_factory)
        settings = settings.model_copy(update={"vpn_container": name})
        async with pool_stack(settings, runtime) as stack:
            async def vpn(health: str, connected: bool) -> dict[str, Any] | None:
                status, body = await stack.get("/ace/vpn/status")
                assert status == 200
                return body if body["health"] == health and body["connected"] is connected else None

            healthy = await until(lambda: vpn("healthy", True), 30, "the VPN reported healthy")
            assert healthy["enabled"] is True and healthy["status"] == "running"
            assert healthy["container_name"] == healthy["container"] == name
            assert healthy["forwarded_port"] == 12345 and healthy["last_check"] == healthy["last_check_at"]
            iso(healthy["last_check"])
            status, made = await stack.post("/ace/provision/acestream", {})
            assert status == 200, made
            await until(lambda: _healthy(stack, made["container_id"]), 20, "the engine healthy")
            # Docker says unhealthy and the engine says it has no network: the VPN is down...
            await fake(made["host_http_port"], connected=False)
            await switch_vpn(control, healthy=False)
            await until(lambda: vpn("unhealthy", False), 30, "the VPN reported unhealthy")
            status, body = await stack.post("/ace/provision/acestream", {})
            assert status == 503 and body["error"] == "vpn-down" and body["retryable"] is True, body
            # ...until an engine reports a connection: the double-check says healthy.
            await fake(made["host_http_port"], connected=True)
            await until(lambda: vpn("healthy", True), 30, "the VPN double-checked healthy")


async def _healthy(stack: Stack, container_id: str) -> bool:
    found = await engine(stack, container_id)
    return found is not None and found["health_status"] == "healthy"


async def test_exhausted_ports_and_a_silent_controller_are_answered_with_their_cause(
        settings_factory: Callable[..., Settings], runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory)
    first = int(settings.ace_pool["hostPorts"].split("-")[0])
    settings = settings.model_copy(update={
        "ace_pool": {**settings.ace_pool, "hostPorts": f"{first}-{first}"},
        # An inspection whose outcome cannot come in time: the signal expires before it is served.
        "operation_timeouts_ms": {"pool-inspect": 1}})
    async with pool_stack(settings, runtime) as stack:
        status, made = await stack.post("/ace/provision/acestream", {})
        assert status == 200 and made["host_http_port"] == first, made
        response = await stack.client.post("/ace/provision/acestream", json={})
        body = await response.json()
        assert response.status == 503 and body["error"] == "ports-exhausted" and body["retryable"] is True, body
        assert f"{first}-{first}" in body["message"] and response.headers["Retry-After"]
        status, body = await stack.get(f"/ace/containers/{made['container_id']}")
        assert status == 504 and body["error"] == "timeout", body
        status, operation = await stack.get(f"/api/operations/{body['operationId']}")
        assert status == 200 and operation["status"] == "timed_out" and operation["signal"] == "pool-inspect"


async def test_a_stream_its_engine_no_longer_knows_is_ended_by_the_collector(
        settings_factory: Callable[..., Settings], runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory)
    async with pool_stack(settings, runtime) as stack:
        status, made = await stack.post("/ace/provision/acestream", {})
        assert status == 200, made
        await until(lambda: _healthy(stack, made["container_id"]), 20, "the engine healthy")
        for stream_id, session in (("gone", "s1"), ("stays", "s2")):
            status, _ = await stack.post("/ace/events/stream_started", started_event(made, stream_id, session))
            assert status == 200
        # The engine forgets one session (as after its player stopped without telling anyone).
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{made['host_http_port']}/ace/cmd/0a48/s1?method=stop") as resp:
                assert resp.status == 200

        async def statuses() -> dict[str, str] | None:
            found = {s["id"]: s["status"] for s in (await stack.get("/ace/streams"))[1]}
            return found if found.get("gone") == "ended" else None

        assert await until(statuses, 20, "the forgotten stream ended") == {"gone": "ended", "stays": "started"}
        status, one = await stack.get(f"/ace/engines/{made['container_id']}")
        assert status == 200 and one["engine"]["streams"] == ["stays"]


async def test_an_engine_removed_behind_the_pools_back_leaves_the_list_at_once(
        settings_factory: Callable[..., Settings], runtime: DockerRuntime) -> None:
    # Probes and listings every 30 s: only Docker's event stream can tell the pool in time.
    settings = pool_settings(settings_factory, health={"intervalS": 30})
    async with pool_stack(settings, runtime) as stack:
        status, made = await stack.post("/ace/provision/acestream", {})
        assert status == 200, made
        status, _ = await stack.post("/ace/events/stream_started", started_event(made, "cut"))
        assert status == 200
        await runtime.remove(made["container_id"])
        async def gone() -> bool:
            return not await engines(stack)

        await until(gone, 10, "the removed engine gone from the list")

        async def ended() -> bool:
            found = {s["id"]: s["status"] for s in (await stack.get("/ace/streams"))[1]}
            return found.get("cut") == "ended"

        await until(ended, 10, "its stream ended")


async def test_a_pool_controller_in_a_container_provisions_and_probes(settings_factory: Callable[..., Settings],
                                                                      runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory).model_copy(update={"controller_mode": "container"})
    async with pool_stack(settings, runtime) as stack:
        controller = await runtime.get(f"cp-{OWNER}-{settings.ace_pool_id}-ctl")
        assert controller is not None and controller.state == "running"
        status, made = await stack.post("/ace/provision/acestream", {})
        assert status == 200, made
        await until(lambda: _healthy(stack, made["container_id"]), 30, "the engine probed healthy from the container")
        response = await stack.client.delete(f"/ace/containers/{made['container_id']}")
        assert response.status == 200 and await runtime.get(made["container_id"]) is None


async def test_two_gateways_serve_one_pool_as_one(settings_factory: Callable[..., Settings],
                                                  runtime: DockerRuntime) -> None:
    from tests.conftest import fresh_postgres_database

    async with fresh_postgres_database() as url:
        settings = pool_settings(settings_factory).model_copy(update={"database_url": SecretStr(url)})
        async with pool_stack(settings.model_copy(update={"gateway_id": "gw-a"}), runtime) as a, \
                running_stack(settings.model_copy(update={"gateway_id": "gw-b"}), runtime, with_host=False) as b:
            status, made = await a.post("/ace/provision/acestream", {})
            assert status == 200, made
            await until(lambda: _healthy(b, made["container_id"]), 20, "the engine listed by the other gateway")
            status, _ = await a.post("/ace/events/stream_started", started_event(made, "shared"))
            assert status == 200

            async def stream_on(gw: Stack, wanted: str) -> bool:
                return {s["id"]: s["status"] for s in (await gw.get("/ace/streams"))[1]}.get("shared") == wanted

            await until(lambda: stream_on(b, "started"), 10, "the stream started through the other gateway")
            status, ended = await b.post("/ace/events/stream_ended", {"stream_id": "shared"})
            assert status == 200 and ended["updated"] is True
            await until(lambda: stream_on(a, "ended"), 10, "the stream ended through the other gateway")
            status, again = await a.post("/ace/events/stream_ended", {"stream_id": "shared"})
            assert status == 200 and again["updated"] is False  # ended once, whichever gateway is asked


async def test_protected_endpoints_need_the_bearer_key(settings_factory: Callable[..., Settings],
                                                       runtime: DockerRuntime) -> None:
    settings = pool_settings(settings_factory).model_copy(update={"api_key": SecretStr("k" * 16)})
    async with pool_stack(settings, runtime) as stack:
        admin = {"Authorization": "Bearer " + "k" * 16}
        wrong = {"Authorization": "Bearer " + "x" * 16}
        query = {"key": "stream_id", "value": "ch-1"}
        assert (await stack.client.get("/ace/by-label", params=query)).status == 401
        assert (await stack.client.get("/ace/by-label", params=query, headers=wrong)).status == 403
        response = await stack.client.get("/ace/by-label", params=query, headers=admin)
        assert response.status == 200 and await response.json() == []
        for method, path in (("POST", "/ace/gc"), ("POST", "/ace/scale/1"), ("DELETE", "/ace/containers/abc"),
                             ("POST", "/ace/provision/acestream")):
            assert (await stack.client.request(method, path)).status == 401, path
            assert (await stack.client.request(method, path, headers=wrong)).status == 403, path
        # Reads stay open unless the operator protects them; metrics always are.
        assert (await stack.client.get("/ace/engines")).status == 200
        assert (await stack.client.get("/ace/metrics")).status == 200
        response = await stack.client.post("/ace/gc", headers=admin)
        assert response.status == 200 and (await response.json())["removed"] == []


async def test_engines_reached_at_their_own_address_on_the_pools_network(settings_factory: Callable[..., Settings],
                                                                        runtime: DockerRuntime) -> None:
    # What a controller in a container on the engines' network does (docker-compose.yml).
    settings = pool_settings(settings_factory, probeAddress="container")
    async with pool_stack(settings, runtime) as stack:
        status, made = await stack.post("/ace/provision/acestream", {})
        assert status == 200, made
        await until(lambda: _healthy(stack, made["container_id"]), 20, "the engine probed at its own address")
        status, _ = await stack.post("/ace/events/stream_started", started_event(made, "inside"))
        assert status == 200

        async def stats() -> list[dict[str, Any]]:
            return (await stack.get("/ace/streams/inside/stats"))[1]

        assert (await until(stats, 20, "statistics read at the engine's own address"))[0]["status"] == "dl"
