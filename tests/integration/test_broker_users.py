"""Each launched container talks to the broker as a user of its own, which the broker itself
limits to the container's queues and routing keys. Real RabbitMQ and Docker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import docker
import pytest
from aio_pika.exceptions import AMQPError
from yarl import URL

from controlplane.client.streams import StreamPublisher
from controlplane.contract import keys
from controlplane.contract.models import Status
from controlplane.bus.management import Management
from tests.conftest import BROKER, MANAGEMENT, OWNER, Stack, fresh_vhost, new_key, new_swarm_id, running_stack
from tests.integration.test_swarm_lifecycle import TEMPLATE, act

pytestmark = pytest.mark.integration


def _amqp_url_of(container: str) -> str:
    with docker.APIClient(base_url="unix:///var/run/docker.sock", version="auto") as client:
        env = client.inspect_container(container)["Config"]["Env"]
    return next(v.split("=", 1)[1] for v in env if v.startswith("CP_AMQP_URL="))


async def _publish(connection: aio_pika.abc.AbstractConnection, routing_key: str, body: dict[str, Any],
                   exchange: str = keys.CONTROL_EXCHANGE) -> None:
    """A confirmed publish on a channel of its own (a refusal closes the channel)."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
        await asyncio.wait_for(target.publish(aio_pika.Message(json.dumps(body).encode()), routing_key), 10)
    finally:
        if not channel.is_closed:
            await channel.close()


async def _refused(connection: aio_pika.abc.AbstractConnection, routing_key: str, exchange: str = keys.CONTROL_EXCHANGE,
                   ) -> str:
    with pytest.raises(AMQPError) as caught:
        await _publish(connection, routing_key, {"forged": True}, exchange)
    return str(caught.value)


async def test_a_bee_may_publish_only_its_own_events(stack: Stack, watch: Any) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#")
    await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
    try:
        url = _amqp_url_of(keys.container_name(OWNER, swarm_id, "generator"))
        instance = keys.bee_instance(swarm_id, "generator")
        assert URL(url).user == f"cp.{OWNER}.generator.{instance}", "not the shared account"
        connection = await aio_pika.connect(url)
        try:
            refused = await _refused(connection, keys.signal_key("swarm-template", swarm_id))
            assert "ACCESS_REFUSED" in refused and "topic" in refused
            await _refused(connection, keys.ready_key("swarm-remove", swarm_id))
            await _refused(connection, keys.ready_key("swarm-remove", instance))  # a scope that looks like its own
            await _refused(connection, keys.HOST_CONTROLLER_QUEUE, exchange="")  # straight into a queue
            # What is its own goes through, with the same credentials.
            status = Status(kind="status-delta", role="generator", instance=instance, swarm_id=swarm_id)
            await _publish(connection, status.routing_key(), status.to_dict())
        finally:
            await connection.close()
    finally:
        await act(stack, watcher, swarm_id, "remove")


async def test_a_controller_container_may_act_for_its_own_swarm_only(settings_factory: Any, runtime: Any,
                                                                      watch: Any) -> None:
    async with running_stack(settings_factory(controller_mode="container"), runtime) as stack:
        swarm_id, other = new_swarm_id(), new_swarm_id()
        watcher = await watch("ev.#")
        await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
        try:
            url = _amqp_url_of(keys.container_name(OWNER, swarm_id, keys.CONTROLLER_PART))
            assert URL(url).user == f"cp.{OWNER}.swarm-controller.{swarm_id}"
            connection = await aio_pika.connect(url)
            try:
                await _refused(connection, keys.signal_key("swarm-create", other))
                await _refused(connection, keys.ready_key("swarm-remove", other))
                await _refused(connection, keys.signal_key("config-update", f"generator.{keys.bee_instance(other, 'generator')}"))
            finally:
                await connection.close()
            # Its own work still goes through: a start reaches its bee and comes back.
            _, started = await act(stack, watcher, swarm_id, "start")
            assert started["state"]["status"] == "Running"
        finally:
            await act(stack, watcher, swarm_id, "remove")
        # The controller's user goes once the host controller has retired it, right after the remove.
        async with Management(MANAGEMENT) as management, asyncio.timeout(20):
            while left := [u for u in await management.users() if swarm_id in u]:
                await asyncio.sleep(0.2)
        assert not left, "a removed swarm leaves no broker user behind"


async def test_an_event_whose_body_disagrees_with_its_key_is_dropped_and_counted(stack: Stack, watch: Any) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#")
    await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})  # statuses of unknown swarms are ignored
    try:
        forged = Status(kind="status-full", role="generator", instance=keys.bee_instance(swarm_id, "forged"), swarm_id=swarm_id)
        honest = Status(kind="status-full", role="generator", instance=keys.bee_instance(swarm_id, "honest"), swarm_id=swarm_id)
        before = await _mismatches(stack)
        # Under another component's key: what a component allowed only that key could send.
        await stack.bus.publish(honest.routing_key(), forged)
        await stack.bus.publish(honest.routing_key(), honest)  # comes after it on the same queue
        async with asyncio.timeout(10):
            while (await stack.get(f"/api/components/generator/{keys.bee_instance(swarm_id, 'honest')}"))[0] != 200:
                await asyncio.sleep(0.05)
        assert (await stack.get(f"/api/components/generator/{keys.bee_instance(swarm_id, 'forged')}"))[0] == 404
        assert await _mismatches(stack) == before + 1
    finally:
        await act(stack, watcher, swarm_id, "remove")


async def _mismatches(stack: Stack) -> float:
    text = await (await stack.client.get("/metrics")).text()
    found = re.search(r'^cp_messages_key_mismatch_total\{kind="status"\} (\S+)$', text, re.MULTILINE)
    assert found, "the counter is exported"
    return float(found.group(1))


async def test_gateway_and_host_controller_run_as_their_own_users(settings_factory: Any, runtime: Any,
                                                                   tmp_path: Path) -> None:
    async with fresh_vhost() as vhost:
        admin = f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}"
        env = {**os.environ, "CP_AMQP_URL": admin, "CP_INSTANCE_ID": f"{OWNER}-own", "CP_GATEWAY_ID": "gw1",
               "CP_BROKER_USER_SECRET": "a-secret-for-this-test"}
        made = subprocess.run([sys.executable, "-m", "controlplane.cli", "broker-users", "--stream-publisher", "cam1"],
                              env=env, check=True, capture_output=True, text=True, timeout=60)
        urls = dict(line.rsplit(maxsplit=1) for line in made.stdout.splitlines())
        gateway_url = urls["gateway"].removeprefix("CP_AMQP_URL=")
        host_url = urls["host-controller"].removeprefix("CP_AMQP_URL=")
        publisher_url = urls["stream-publisher cam1"].removeprefix("AMQP_URL=")
        assert URL(gateway_url).user == f"cp.{OWNER}-own.gateway.gw1"

        common = {"instance_id": f"{OWNER}-own", "broker_user_secret": "a-secret-for-this-test",
                  "bee_amqp_url": admin}
        # The host controller's stack serves a gateway of its own too: another id, another store.
        host_settings = settings_factory(amqp_url=host_url, gateway_id="gw-host", **common,
                                         database_url=f"sqlite:///{tmp_path / 'host.db'}")
        gateway_settings = settings_factory(amqp_url=gateway_url, gateway_id="gw1", **common,
                                            database_url=f"sqlite:///{tmp_path / 'gw1.db'}")
        async with running_stack(host_settings, runtime) as host_side, \
                running_stack(gateway_settings, runtime, with_host=False) as gateway:
            swarm_id = new_swarm_id()
            status, envelope = await gateway.post(f"/api/swarms/{swarm_id}/create",
                                                  {"idempotencyKey": new_key(), "templateId": TEMPLATE})
            assert status == 202
            _, operation = await gateway.get(f"/api/operations/{envelope['correlationId']}?wait=90")
            assert operation["status"] == "succeeded", operation
            assert host_side.host is not None
            connection = await aio_pika.connect(gateway_url)
            try:  # the gateway publishes commands, never another component's success
                await _refused(connection, keys.ready_key("swarm-remove", swarm_id))
                await _refused(connection, keys.state_key("generator", keys.bee_instance(swarm_id, "generator")))
            finally:
                await connection.close()
            status, envelope = await gateway.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()})
            _, operation = await gateway.get(f"/api/operations/{envelope['correlationId']}?wait=60")
            assert operation["status"] == "succeeded", operation
            # The streams registry under the gateway's own user (its events, a mandatory request
            # and its reply queue) and a publisher under a user of its own, which may answer
            # stream requests and do nothing else.
            advert = {"name": "cam", "stream_type": "ndi", "publisher_id": "p", "protocol": "ndi",
                      "address": "10.0.0.1", "port": 5960}
            base = str(gateway.client.make_url("")).rstrip("/")
            assert URL(publisher_url).user == f"cp.{OWNER}-own.stream-publisher.cam1"
            async with StreamPublisher(base, publisher_url, advert) as publisher:
                status, offer = await gateway.post(f"/streams/{publisher.stream_id}/request",
                                                   {"consumer_id": "c", "consumer_address": "10.0.0.2"})
                assert status == 201, offer
                assert (await gateway.client.delete(f"/streams/sessions/{offer['session_id']}")).status == 200
            connection = await aio_pika.connect(publisher_url)
            try:
                await _refused(connection, keys.signal_key("swarm-create", swarm_id))
                await _refused(connection, keys.registry_event_key(keys.STREAM_EXPIRED, publisher.stream_id))
                await _refused(connection, keys.HOST_CONTROLLER_QUEUE, exchange="")  # no default exchange
            finally:
                await connection.close()


async def test_up_runs_gateway_and_host_controller_as_their_own_users(tmp_path: Path) -> None:
    owner = f"{OWNER}-up"
    async with fresh_vhost() as vhost:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**os.environ, "CP_AMQP_URL": f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}",
               "CP_PORT": str(port), "CP_INSTANCE_ID": owner, "CP_LOG_LEVEL": "WARNING",
               "CP_DATABASE_URL": f"sqlite:///{tmp_path / 'up.db'}"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "controlplane.cli", "up", env=env,
                                                    stderr=asyncio.subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as http, asyncio.timeout(60):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                            if response.status == 200:  # a confirmed publish went through
                                break
                    await asyncio.sleep(0.2)
            expected = {f"cp.{owner}.gateway.{owner}", f"cp.{owner}.host-controller.{owner}"}
            async with Management(MANAGEMENT) as management, asyncio.timeout(30):
                while (users := {c["user"] for c in await management.connections() if c["vhost"] == vhost}) != expected:
                    await asyncio.sleep(0.5)  # the management API lists connections a few seconds late
            assert "guest" not in users
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)


async def test_no_management_api_fails_the_create_with_its_cause(settings_factory: Any, runtime: Any,
                                                                  watch: Any) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    settings = settings_factory(management_url=f"http://127.0.0.1:{closed}/")
    async with running_stack(settings, runtime) as stack:
        swarm_id = new_swarm_id()
        watcher = await watch("ev.#")
        _, failed = await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE}, expect="error")
        assert failed["code"] == "broker-user-failed" and failed["retryable"] is True
        assert "did not answer" in failed["message"]
        assert await runtime.get(keys.container_name(OWNER, swarm_id, "generator")) is None, "no bee without its user"
