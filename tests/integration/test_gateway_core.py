"""The gateway's core under faults and the ways a caller can wait: real RabbitMQ, real Docker.

- a gateway killed between commit and publish: the next one publishes the signal, once;
- ``Prefer: wait`` and ``GET /api/operations/{id}?wait=``;
- the ``Idempotency-Key`` header; a retry answered from its key before any precondition;
- ``/readyz`` follows the broker connection, through a real publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from controlplane.bus import Bus
from controlplane.contract.topology import load_topology
from controlplane.gateway.app import open_gateway
from controlplane.store import open_store
from tests.conftest import BROKER, Stack, drop_connections, new_key, new_swarm_id, running_stack

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class BlackholeProxy:
    """A TCP proxy to the broker that can stop forwarding: what the client sends is dropped
    and nothing comes back, as when a network path dies without closing the connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.forwarding = True
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if self.forwarding:
                        dst.write(data)
                        await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def _outcome(watcher: Any, topic: str, timeout: float = 90) -> dict[str, Any]:
    """The success outcome on ``ev.ready.<topic>``; an error outcome fails the test at once."""
    async with asyncio.timeout(timeout):
        while True:
            for key, body in watcher.seen:
                assert key != f"ev.error.{topic}", body
                if key == f"ev.ready.{topic}":
                    return body
            await asyncio.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.1)


async def test_gateway_killed_between_commit_and_publish(settings_factory: Any, runtime: Any, watch: Any,
                                                         vhost: str, tmp_path: Path) -> None:
    settings = settings_factory()
    swarm_id = new_swarm_id("ob")
    watcher = await watch(f"sig.swarm-create.{swarm_id}", f"ev.*.swarm-create.{swarm_id}")
    host, port = BROKER.split(":")
    async with BlackholeProxy((host, int(port))) as proxy:
        http_port = _free_port()
        env = {**os.environ, "CP_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/{quote(vhost, safe='')}",
               "CP_DATABASE_URL": settings.database_url.get_secret_value(), "CP_PORT": str(http_port),
               "CP_INSTANCE_ID": settings.instance_id, "CP_GATEWAY_ID": "gw-killed", "CP_LOG_LEVEL": "WARNING"}
        gateway = await asyncio.create_subprocess_exec(sys.executable, "-m", "controlplane.cli", "gateway",
                                                       env=env, cwd=PROJECT_ROOT)
        try:
            async with aiohttp.ClientSession() as http:
                async def listening() -> bool:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"http://127.0.0.1:{http_port}/healthz") as resp:
                            return resp.status == 200
                    return False

                await _wait_until(listening, 60, "gateway listening")
                proxy.forwarding = False  # the signal's publish now goes nowhere and is never confirmed
                body = {"templateId": "generator-demo", "idempotencyKey": new_key()}
                post = asyncio.ensure_future(http.post(f"http://127.0.0.1:{http_port}/api/swarms/{swarm_id}/create",
                                                       json=body))
                store = await open_store(settings.database_url.get_secret_value())
                try:
                    async def committed() -> bool:
                        return any(op.swarm_id == swarm_id for op in await store.open_operations())

                    await _wait_until(committed, 30, "operation committed")
                finally:
                    await store.close()
                gateway.send_signal(signal.SIGKILL)
                await gateway.wait()
                post.cancel()
                with contextlib.suppress(BaseException):
                    await post
        finally:
            if gateway.returncode is None:
                gateway.kill()
                await gateway.wait()
    assert f"sig.swarm-create.{swarm_id}" not in watcher.keys_seen()

    # The next gateway on the same store publishes what was committed, once; the create runs.
    async with running_stack(settings, runtime) as stack:
        outcome = await _outcome(watcher, f"swarm-create.{swarm_id}")
        assert watcher.keys_seen().count(f"sig.swarm-create.{swarm_id}") == 1
        status, op = await stack.get(f"/api/operations/{outcome['correlationId']}?wait=10")
        assert status == 200 and op["status"] == "succeeded"
        # A retry of the killed request is answered with the same envelope and publishes nothing.
        status, envelope = await stack.post(f"/api/swarms/{swarm_id}/create", body)
        assert status == 202 and envelope["correlationId"] == outcome["correlationId"]
        status, _ = await stack.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()},
                                     headers={"Prefer": "wait=90"})
        assert status == 200
    assert watcher.keys_seen().count(f"sig.swarm-create.{swarm_id}") == 1


async def test_prefer_wait_and_long_poll(stack: Stack, watch: Any) -> None:
    swarm_id = new_swarm_id("pw")
    watcher = await watch(f"ev.*.*.{swarm_id}")
    # A wait far shorter than the work: the usual envelope.
    create = {"templateId": "generator-demo", "idempotencyKey": new_key()}
    status, envelope = await stack.post(f"/api/swarms/{swarm_id}/create", create, headers={"Prefer": "wait=0.001"})
    assert status == 202 and "watch" in envelope
    # Long-poll the operation until it closes.
    status, op = await stack.get(f"/api/operations/{envelope['correlationId']}?wait=90")
    assert status == 200 and op["status"] == "succeeded"
    # A wait long enough: 200 with the closed operation, its outcome included.
    status, op = await stack.post(f"/api/swarms/{swarm_id}/start", {"idempotencyKey": new_key()},
                                  headers={"Prefer": "respond-async, wait=60"})
    assert status == 200, op
    assert op["status"] == "succeeded" and op["outcome"]["result"] == "success"
    assert op["outcome"]["state"]["status"] == "Running"
    status, answer = await stack.get(f"/api/operations/{envelope['correlationId']}?wait=soon")
    assert status == 400 and answer["fields"][0]["field"] == "wait"
    status, _ = await stack.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()},
                                 headers={"Prefer": "wait=90"})
    assert status == 200
    await watcher.wait_for(f"ev.ready.swarm-remove.{swarm_id}", timeout=90)


async def test_idempotency_key_header_and_replay_before_preconditions(stack: Stack, watch: Any) -> None:
    swarm_id = new_swarm_id("ik")
    key = new_key()
    status, envelope = await stack.post(f"/api/swarms/{swarm_id}/create", {"templateId": "generator-demo"},
                                        headers={"Idempotency-Key": key, "Prefer": "wait=90"})
    assert status == 200 and envelope["idempotencyKey"] == key and envelope["status"] == "succeeded"
    # The same key in the header: the same answer's operation, nothing new published.
    status, again = await stack.post(f"/api/swarms/{swarm_id}/create", {"templateId": "generator-demo"},
                                     headers={"Idempotency-Key": key})
    assert status == 202 and again["correlationId"] == envelope["correlationId"]
    assert again.get("watch")  # a replay answers with the envelope
    status, mismatch = await stack.post(f"/api/swarms/{swarm_id}/start", {"idempotencyKey": new_key()},
                                        headers={"Idempotency-Key": new_key()})
    assert status == 400 and mismatch["error"] == "idempotency-key-mismatch"

    # A component config retried after its swarm is gone: answered from its key, not 404.
    _, registry = await stack.get(f"/api/components?swarmId={swarm_id}&role=generator")
    generator = registry["components"][0]["instance"]
    config = {"idempotencyKey": new_key(), "patch": {"ratePerSec": 5}}
    status, first = await stack.post(f"/api/components/generator/{generator}/config", config)
    assert status == 202
    status, _ = await stack.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()},
                                 headers={"Prefer": "wait=90"})
    assert status == 200
    status, _ = await stack.get(f"/api/components/generator/{generator}")
    assert status == 404
    status, retry = await stack.post(f"/api/components/generator/{generator}/config", config)
    assert status == 202 and retry["correlationId"] == first["correlationId"]


async def test_readyz_follows_the_broker_connection(settings_factory: Any, runtime: Any, vhost: str) -> None:
    settings = settings_factory()
    url = f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}"
    name = f"readyz-{new_key()[:8]}"
    from aiohttp.test_utils import TestClient, TestServer

    async with Bus(url, load_topology(settings.topology_file), name) as bus, open_gateway(settings, bus) as app:
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            resp = await client.get("/readyz")
            assert resp.status == 200 and (await resp.json())["checks"]["broker"] == "ok"
            await drop_connections(name)

            def status_is(wanted: int) -> Any:
                async def check() -> bool:
                    return (await client.get("/readyz")).status == wanted
                return check

            await _wait_until(status_is(503), 20, "not ready while the connection is down")
            await _wait_until(status_is(200), 60, "ready again after the reconnect")
        finally:
            await client.close()
