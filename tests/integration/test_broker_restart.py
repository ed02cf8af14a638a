"""RabbitMQ restarts under a running swarm: gateway, host controller, swarm-controller and the
bee in its container all reconnect, and the swarm obeys the next signal.

It restarts the broker application of this machine (``rabbitmqctl stop_app`` / ``start_app``),
so it waits for the broker to be back before it ends.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import pytest

from controlplane.contract import keys
from tests.conftest import OWNER, Stack, new_key, new_swarm_id
from tests.integration.test_swarm_lifecycle import TEMPLATE, act

pytestmark = pytest.mark.integration


async def _rabbitmqctl(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", *args, stdout=subprocess.DEVNULL)
    assert await asyncio.wait_for(proc.wait(), 120) == 0, f"rabbitmqctl {' '.join(args)} failed"


async def test_swarm_obeys_after_a_broker_restart(stack: Stack, watch: Any) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#")
    await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
    await act(stack, watcher, swarm_id, "start")

    await _rabbitmqctl("stop_app")
    try:
        await asyncio.sleep(1)
    finally:
        await _rabbitmqctl("start_app")
        await _rabbitmqctl("await_startup")

    # The test's own watcher binds anew (once its connection is back): what is under test is
    # the control plane's reconnection, not the watcher's.
    async with asyncio.timeout(60):
        while True:
            try:
                watcher = await watch("ev.#")
                break
            except Exception:  # its robust connection is still reconnecting
                await asyncio.sleep(0.5)
    # Until the gateway has reconnected a request is refused with 503 and nothing is kept,
    # so the caller retries with the same key.
    body = {"idempotencyKey": new_key()}
    for _ in range(120):
        status, envelope = await stack.post(f"/api/swarms/{swarm_id}/stop", body)
        if status == 202:
            break
        assert status == 503, envelope
        await asyncio.sleep(0.5)
    assert status == 202
    try:
        stopped = await watcher.wait_for(f"ev.ready.swarm-stop.{swarm_id}", 60,
                                         where=lambda b: b["correlationId"] == envelope["correlationId"])
    except TimeoutError:
        op = await stack.get(f"/api/operations/{envelope['correlationId']}")
        view = await stack.get(f"/api/swarms/{swarm_id}")
        logs = await stack.host.runtime.logs_tail(keys.container_name(OWNER, swarm_id, "generator"), 40)
        pytest.fail(f"no outcome; operation {op}; swarm {view}; bee log {logs}")
    assert stopped["state"]["status"] == "Stopped", "controller and bee obeyed after the restart"
    await act(stack, watcher, swarm_id, "remove")
