"""Bad input and auth at the real gateway: always a 4xx naming the field, never a 500."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack, new_key, new_swarm_id, running_stack

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateway(settings_factory: Any, runtime: Any) -> Any:
    async with running_stack(settings_factory(), runtime, with_host=False) as stack:
        yield stack


@pytest.mark.parametrize("raw, field", [
    ("{not json", "(body)"),
    ("[1, 2]", "(body)"),
    ("", "(body)"),
    ('{"templateId": "generator-demo"}', "idempotencyKey"),
    ('{"templateId": "generator-demo", "idempotencyKey": "not-a-uuid"}', "idempotencyKey"),
    ('{"idempotencyKey": "6f1c1b38-8d1b-4c8a-9d0e-2f8a1f0e9b11"}', "templateId"),
    ('{"idempotencyKey": "6f1c1b38-8d1b-4c8a-9d0e-2f8a1f0e9b11", "templateId": "generator-demo", "colour": 1}',
     "colour"),
])
async def test_malformed_bodies_name_the_field(gateway: Stack, raw: str, field: str) -> None:
    status, body = await gateway.post(f"/api/swarms/{new_swarm_id()}/create", raw)
    assert status == 400, body
    assert field == "(body)" or field in body["message"]
    assert any(f["field"] == field for f in body["fields"])


@pytest.mark.parametrize("swarm_id", ["has.dots", "UpperCase", "x" * 33, "-leading", "under_score"])
async def test_bad_swarm_ids_are_refused(gateway: Stack, swarm_id: str) -> None:
    status, body = await gateway.post(f"/api/swarms/{swarm_id}/create",
                                      {"idempotencyKey": new_key(), "templateId": "generator-demo"})
    assert status == 400 and body["fields"][0]["field"] == "swarmId", body


async def test_unknown_template_and_unknown_swarm(gateway: Stack) -> None:
    status, body = await gateway.post(f"/api/swarms/{new_swarm_id()}/create",
                                      {"idempotencyKey": new_key(), "templateId": "no-such-template"})
    assert status == 422 and body["fields"][0]["field"] == "templateId"
    for action in ("start", "stop", "remove"):
        status, body = await gateway.post(f"/api/swarms/{new_swarm_id()}/{action}", {"idempotencyKey": new_key()})
        assert status == 404 and body["error"] == "unknown-swarm"
    status, body = await gateway.get("/api/operations/no-such-operation")
    assert status == 404


async def test_swarm_plan_cannot_ask_for_privileges(gateway: Stack) -> None:
    plan = {"bees": [{"name": "x", "role": "generator", "image": "controlplane:local", "privileged": True}]}
    status, body = await gateway.post(f"/api/swarms/{new_swarm_id()}/template",
                                      {"idempotencyKey": new_key(), "swarmPlan": plan})
    assert status == 400 and "privileged" in body["message"]


async def test_swarm_plan_runs_only_allowed_images(gateway: Stack) -> None:
    plan = {"bees": [{"name": "ok", "role": "generator", "image": "controlplane:local"},
                     {"name": "x", "role": "generator", "image": "controlplane-busybox:local"}]}
    status, body = await gateway.post(f"/api/swarms/{new_swarm_id()}/template",
                                      {"idempotencyKey": new_key(), "swarmPlan": plan})
    assert status == 422 and body["fields"] == [
        {"field": "swarmPlan.bees.1.image", "reason": "image 'controlplane-busybox:local' is not allowed"}]


async def test_component_endpoints_refuse_bad_input(gateway: Stack) -> None:
    key = new_key()
    status, body = await gateway.post("/api/components/Gen/x/config", {"idempotencyKey": key, "patch": {"a": 1}})
    assert status == 400 and body["fields"][0]["field"] == "role"
    status, body = await gateway.post("/api/components/generator/a.b/status-request", {"idempotencyKey": key})
    assert status == 400 and body["fields"][0]["field"] == "instance"
    status, body = await gateway.post("/api/components/generator/x/config", {"idempotencyKey": key, "patch": {}})
    assert status == 400 and body["fields"][0]["field"] == "patch"
    status, body = await gateway.post("/api/components/generator/x/config", {"idempotencyKey": key, "patch": [1]})
    assert status == 400 and body["fields"][0]["field"] == "patch"
    status, body = await gateway.post("/api/components/generator/x/config", {"idempotencyKey": key, "patch": {"a": 1}})
    assert status == 404 and body["error"] == "unknown-component"
    status, body = await gateway.get("/api/components/generator/x")
    assert status == 404 and body["error"] == "unknown-component"
    status, body = await gateway.get("/api/components?health=sparkling")
    assert status == 400 and body["fields"][0]["field"] == "health"
    status, body = await gateway.post("/api/controllers/config", {"idempotencyKey": key, "enabled": "no",
                                                                  "targets": ["generator.x"]})
    assert status == 400 and {f["field"] for f in body["fields"]} == {"enabled", "targets"}


async def test_bulk_toggle_with_nothing_registered_succeeds_at_once(gateway: Stack) -> None:
    key = new_key()
    status, envelope = await gateway.post("/api/controllers/config", {"idempotencyKey": key, "enabled": False})
    assert status == 202 and envelope["targets"] == [] and envelope["timeoutMs"] == 60000
    status, op = await gateway.get(f"/api/operations/{envelope['correlationId']}")
    assert status == 200 and op["status"] == "succeeded"
    status, again = await gateway.post("/api/controllers/config", {"idempotencyKey": key, "enabled": False})
    assert status == 202 and again == envelope, "a retry is answered from the idempotency record"
    status, body = await gateway.post("/api/controllers/config", {"idempotencyKey": key, "enabled": True})
    assert status == 422 and body["error"] == "idempotency-key-reused"


async def test_templates_listed_and_health_endpoints(gateway: Stack) -> None:
    status, body = await gateway.get("/api/templates")
    assert status == 200
    listed = {t["id"]: t for t in body["templates"]}
    assert {"generator-demo", "http-load", "http-trigger"} <= set(listed) and body["invalid"] == []
    assert listed["generator-demo"]["bees"] == [{
        "name": "generator", "role": "generator", "image": "controlplane:local", "env": {}, "work": {"out": "generated"},
        "enabled": False, "config": {"ratePerSec": 5, "message": {"kind": "demo"}}, "secrets": []}]
    load = listed["http-load"]
    assert [b["role"] for b in load["bees"]] == ["generator", "moderator", "processor", "postprocessor"]
    assert load["sut"]["port"] == 18080 and load["sut"]["image"] == "controlplane:local"
    assert (await gateway.get("/healthz"))[0] == 200
    status, ready = await gateway.get("/readyz")
    assert status == 200 and ready["checks"] == {"broker": "ok", "store": "ok"}
    resp = await gateway.client.get("/metrics")
    assert resp.status == 200 and "cp_http_requests_total" in await resp.text()


async def test_bearer_key_guards_mutations(settings_factory: Any, runtime: Any) -> None:
    async with running_stack(settings_factory(api_key="s3cret-key"), runtime, with_host=False) as gateway:
        path = f"/api/swarms/{new_swarm_id()}/start"
        status, body = await gateway.post(path, {"idempotencyKey": new_key()})
        assert status == 401
        status, body = await gateway.post(path, {"idempotencyKey": new_key()}, headers={"Authorization": "Bearer nope"})
        assert status == 403
        status, body = await gateway.post(path, {"idempotencyKey": new_key()},
                                          headers={"Authorization": "Bearer s3cret-key"})
        assert status == 404, "past auth, the swarm is unknown"
        assert (await gateway.get("/api/swarms"))[0] == 200, "reads stay open"
