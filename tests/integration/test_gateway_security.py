"""Keys and secrets at the gateway: roles, refusal to listen unprotected, redaction in every read
and event. Real RabbitMQ and Docker."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane.contract import keys
from tests.conftest import Stack, new_key, new_swarm_id, running_stack
from tests.integration.test_swarm_lifecycle import act

pytestmark = pytest.mark.integration

ADMIN, READER = "admin-key-0001", "read-key-0001"
SECRET = "hunter2-do-not-show"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_read_key_reads_and_an_admin_key_writes(settings_factory: Any, runtime: Any) -> None:
    async with running_stack(settings_factory(api_key=ADMIN, read_api_key=READER), runtime, with_host=False) as gw:
        assert (await gw.get("/api/swarms"))[0] == 401, "a read key makes reads protected"
        assert (await gw.get("/api/swarms", headers=bearer("wrong-key-000")))[0] == 403
        assert (await gw.get("/api/swarms", headers=bearer(READER)))[0] == 200
        assert (await gw.get("/api/swarms", headers=bearer(ADMIN)))[0] == 200
        assert (await gw.get("/healthz"))[0] == 200, "probes stay open"
        path = f"/api/swarms/{new_swarm_id()}/start"
        status, body = await gw.post(path, {"idempotencyKey": new_key()}, headers=bearer(READER))
        assert status == 403 and body["message"] == "this key may only read"
        status, _ = await gw.post(path, {"idempotencyKey": new_key()}, headers=bearer(ADMIN))
        assert status == 404, "past auth, the swarm is unknown"
        status, spec = await gw.get("/openapi.json")
        assert status == 200, "the description stays open"
        listing = spec["paths"]["/api/swarms"]["get"]
        assert listing["security"] == [{"bearer": []}] and {"401", "403"} <= set(listing["responses"])
        assert "security" not in spec["paths"]["/healthz"]["get"]


async def _start_gateway(**env: str) -> tuple[int | None, str]:
    """``controlplane gateway`` with these settings: its exit code (None: it kept running) and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "gateway", env={**os.environ, "CP_PORT": "1", **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return None, ""
    return proc.returncode, err.decode()


async def test_the_gateway_will_not_listen_unprotected() -> None:
    code, err = await _start_gateway(CP_HOST="0.0.0.0")
    assert code not in (0, None) and "refusing to start" in err and "CP_API_KEY" in err
    code, err = await _start_gateway(CP_API_KEY="")
    assert code not in (0, None) and "CP_API_KEY: Value error, must not be empty" in err
    code, err = await _start_gateway(CP_READ_API_KEY=READER)
    assert code not in (0, None) and "CP_READ_API_KEY needs CP_API_KEY" in err


@pytest.fixture
def secret_scenarios(tmp_path: Path) -> Path:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "secrets.yaml").write_text(json.dumps({
        "id": "secrets",
        "sut": {"image": "controlplane:local", "port": 18082, "env": {"DB_PASSWORD": SECRET}},
        "bees": [{"name": "trigger", "role": "trigger", "image": "controlplane:local",
                  "env": {"TOKEN": SECRET}, "secrets": ["dsn"],
                  "config": {"intervalS": 60, "path": "/ping", "headers": {"Authorization": f"Bearer {SECRET}"},
                             "body": {"dsn": SECRET, "table": "orders"}}}],
    }))
    return folder


async def test_secrets_are_masked_in_every_read_and_event(settings_factory: Any, runtime: Any, watch: Any,
                                                          secret_scenarios: Path) -> None:
    async with running_stack(settings_factory(scenarios_dir=secret_scenarios), runtime) as stack:
        status, templates = await stack.get("/api/templates")
        assert status == 200 and SECRET not in json.dumps(templates)
        [template] = templates["templates"]
        assert template["sut"]["env"] == {"DB_PASSWORD": "***"}
        assert template["bees"][0]["env"] == {"TOKEN": "***"}
        assert template["bees"][0]["config"]["headers"] == {"Authorization": "***"}
        assert template["bees"][0]["config"]["body"] == {"dsn": "***", "table": "orders"}, "marked secret by the plan"

        swarm_id = new_swarm_id()
        watcher = await watch("ev.#")
        await act(stack, watcher, swarm_id, "create", {"templateId": "secrets"})
        try:
            instance = keys.bee_instance(swarm_id, "trigger")
            status, envelope = await stack.post(f"/api/components/trigger/{instance}/config", {
                "idempotencyKey": new_key(), "patch": {"headers": {"X-Api-Key": SECRET}}})
            assert status == 202, envelope
            event = await watcher.wait_for(f"ev.ready.config-update.trigger.{instance}",
                                           where=lambda b: b["correlationId"] == envelope["correlationId"])
            assert event["state"]["details"]["config"]["headers"] == {"X-Api-Key": "***"}
            _, operation = await stack.get(f"/api/operations/{envelope['correlationId']}?wait=30")
            assert operation["status"] == "succeeded" and SECRET not in json.dumps(operation)
            status, components = await stack.get("/api/components", params={"role": "trigger"})
            assert status == 200 and components and SECRET not in json.dumps(components)
            assert SECRET not in json.dumps(watcher.seen), "no event on ph.control carries it"
        finally:
            await act(stack, watcher, swarm_id, "remove")


async def test_a_deeply_nested_body_is_a_400(stack: Stack) -> None:
    for depth in (40, 100_000):  # past the limit; past what the JSON parser itself can nest
        nested = "[" * depth + "1" + "]" * depth
        status, body = await stack.post(f"/api/swarms/{new_swarm_id()}/start",
                                        f'{{"idempotencyKey": "{new_key()}", "notes": {nested}}}')
        assert status == 400 and body["fields"] == [{"field": "(body)", "reason": "nested too deep"}], body
