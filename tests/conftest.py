"""Shared fixtures: real RabbitMQ (a vhost of its own per test session), real Docker, real gateway.

Each session gets a fresh vhost so its queues never mix with a control plane already
running on the machine, and a unique owner id so its host controller only adopts the
containers it created itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.engine import make_url

from controlplane.bus import Bus
from controlplane.bus.management import Management
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.topology import load_topology
from controlplane.runtime.docker import DockerRuntime
from controlplane.runtime.labels import filter_for
from controlplane.runtime.policy import RuntimePolicy

BROKER = os.environ.get("CP_TEST_BROKER", "127.0.0.1:5672")
MANAGEMENT = os.environ.get("CP_TEST_MANAGEMENT", "http://127.0.0.1:15672")


PG_ADMIN_URL = make_url(os.environ.get("CP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards); unreachable is a failure, not a skip."""
    dsn = PG_ADMIN_URL.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL.render_as_string()} ({exc!r}); start it or "
                    "point CP_TEST_POSTGRES_URL at a server where we may create databases", pytrace=False)
    name = f"cp_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield PG_ADMIN_URL.set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def new_key() -> str:
    return str(uuid.uuid4())


def new_swarm_id(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def fresh_vhost() -> AsyncIterator[str]:
    """A RabbitMQ vhost of its own, deleted with everything in it afterwards."""
    async with Management(MANAGEMENT) as management, management.scratch_vhost("cp-test") as name:
        yield name


@pytest.fixture(scope="session")
async def vhost() -> AsyncIterator[str]:
    async with fresh_vhost() as name:
        yield name
    # Broker users outlive vhosts: remove what this session's controllers left behind.
    async with Management(MANAGEMENT) as management:
        for user in await management.users():
            if user.startswith(f"cp.{OWNER}"):
                await management.delete_user(user)


# This session's owner id: its host controllers label and name their containers with it.
OWNER = f"test-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def owner() -> str:
    return OWNER


def make_settings(vhost: str, owner: str, tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        amqp_url=f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}",
        database_url=f"sqlite:///{tmp / 'controlplane.db'}",
        instance_id=owner,
        bee_network="host",
        allow_host_network=True,
        status_interval_s=1.0,
        bee_ready_timeout_s=45.0,
        log_level="WARNING",
        ace_pool_id="",  # the engine pool only where a test asks for it
        services_stats_interval_s=600.0,  # stats sampled only where a test asks for them
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_factory(vhost: str, owner: str, tmp_path: Path) -> Callable[..., Settings]:
    return lambda **overrides: make_settings(vhost, owner, tmp_path, **overrides)


@pytest.fixture(scope="session")
async def runtime(owner: str) -> AsyncIterator[DockerRuntime]:
    policy = RuntimePolicy.from_settings(Settings(instance_id=owner, allow_host_network=True))
    rt = DockerRuntime(url="unix:///var/run/docker.sock", workers=8, policy=policy)
    await rt.ping()
    yield rt
    for info in await rt.list(filter_for(owner=owner)):
        await rt.remove(info.id)
    await rt.close()


async def drop_connections(connection_name: str, timeout: float = 20) -> int:
    """Force-close a client's broker connections, as a broker restart or a network cut would;
    returns how many were closed."""
    async with Management(MANAGEMENT) as management:
        async with asyncio.timeout(timeout):
            # The management API lists a new connection a few seconds late.
            while not (names := await management.connections_named(connection_name)):
                await asyncio.sleep(1)
        for name in names:
            await management.close_connection(name, "test")
    return len(names)


class Watcher:
    """An exclusive queue on ph.control that collects events, for asserting on them."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self.queue = queue
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._arrived = asyncio.Condition()

    async def _on(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with self._arrived:
            self.seen.append((message.routing_key or "", json.loads(message.body)))
            self._arrived.notify_all()

    async def wait_for(self, routing_key: str, timeout: float = 60.0,
                       where: Callable[[dict[str, Any]], bool] = lambda _: True) -> dict[str, Any]:
        """The first event (seen before or arriving later) with this key that matches ``where``."""

        def find() -> dict[str, Any] | None:
            return next((b for k, b in self.seen if k == routing_key and where(b)), None)

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: find() is not None), timeout)
            found = find()
            assert found is not None
            return found

    def keys_seen(self) -> list[str]:
        return [k for k, _ in self.seen]


@pytest.fixture
async def watch(vhost: str) -> AsyncIterator[Callable[..., Any]]:
    """``await watch("ev.#", ...)`` returns a Watcher bound to those patterns."""
    connection = await aio_pika.connect_robust(f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}")
    channel = await connection.channel()
    await channel.declare_exchange(keys.CONTROL_EXCHANGE, type="topic", durable=True)

    async def make(*patterns: str) -> Watcher:
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for pattern in patterns:
            await queue.bind(keys.CONTROL_EXCHANGE, routing_key=pattern)
        watcher = Watcher(queue)
        await queue.consume(watcher._on, no_ack=True)
        return watcher

    yield make
    await connection.close()


class Stack:
    """A running control plane: gateway (HTTP client attached) and host controller."""

    def __init__(self, settings: Settings, bus: Bus, client: TestClient, host: Any) -> None:
        self.settings, self.bus, self.client, self.host = settings, bus, client, host

    async def post(self, path: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
        resp = await self.client.post(path, data=body if isinstance(body, (str, bytes)) else json.dumps(body), **kwargs)
        return resp.status, await resp.json()

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        resp = await self.client.get(path, **kwargs)
        return resp.status, await resp.json()


@asynccontextmanager
async def running_stack(settings: Settings, runtime: DockerRuntime, with_host: bool = True) -> AsyncIterator[Stack]:
    from controlplane.controller.host import HostController
    from controlplane.gateway.app import open_gateway

    async with AsyncExitStack() as stack:
        bus = await Bus(settings.amqp_url.get_secret_value(), load_topology(settings.topology_file), "test").connect()
        stack.push_async_callback(bus.close)
        app = await stack.enter_async_context(open_gateway(settings, bus))
        host = None
        if with_host:
            # The engine of ``runtime``, under the policy of this stack's own settings.
            own = DockerRuntime(runtime.url, workers=8, policy=RuntimePolicy.from_settings(settings))
            stack.push_async_callback(own.close)
            host = await HostController(bus, own, settings).start()
            stack.push_async_callback(host.stop)
        client = TestClient(TestServer(app))
        await client.start_server()
        stack.push_async_callback(client.close)
        yield Stack(settings, bus, client, host)


@pytest.fixture
async def stack(settings_factory: Callable[..., Settings], runtime: DockerRuntime) -> AsyncIterator[Stack]:
    async with running_stack(settings_factory(), runtime) as s:
        yield s
