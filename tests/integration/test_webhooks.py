"""Webhooks of the services surface (/api/webhooks) on a real gateway, delivering to a real
HTTP receiver on 127.0.0.1: registration in the envelope, refusals naming the field, the
egress rules, Standard Webhooks signatures checked two ways, retries under one webhook-id,
and deliveries that outlive the gateway that queued them.

Events are queued with ``webhooks.emit`` on the running gateway's context, as the services
surface's projections do; each test's gateway has a SQLite store of its own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook as Verifier

from controlplane.config import Settings
from controlplane.contract.webhooks import SERVICE_EVENTS
from controlplane.gateway.context import CTX, GatewayContext
from controlplane.gateway.surfaces.services import webhooks
from tests.conftest import Stack, fresh_postgres_database, running_stack
from tests.webhook_receiver import Received, Receiver, free_port, receiving

pytestmark = pytest.mark.integration

SECRET = "s3cret-for-the-receiver-only"
WHSEC = "whsec_" + base64.b64encode(b"thirty-two bytes of webhook key!").decode()
# Retries quick enough for a test, slow enough to be seen one by one.
QUICK = dict(webhook_allowed_targets=["127.0.0.1"], webhook_retry_base_s=0.2, webhook_retry_max_s=1.0,
             webhook_max_attempts=4, webhook_timeout_s=5.0)
WAIT_S = 30.0  # every bounded wait: generous, for a busy two-core machine


# --- helpers -----------------------------------------------------------------------------------


async def until(condition: Callable[[], Any], timeout: float = WAIT_S, step: float = 0.05) -> Any:
    """Poll an async condition until it returns something true, within ``timeout``."""
    async with asyncio.timeout(timeout):
        while not (value := await condition()):
            await asyncio.sleep(step)
        return value


class Api:
    """The gateway's /api/webhooks, every answer's text kept (none may show a secret)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.texts: list[str] = []

    @property
    def ctx(self) -> GatewayContext:
        return self.stack.client.server.app[CTX]

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        data = body if body is None or isinstance(body, (str, bytes)) else json.dumps(body)
        resp = await self.stack.client.request(method, path, data=data)
        text = await resp.text()
        self.texts.append(text)
        return resp.status, json.loads(text)

    async def register(self, url: str, events: list[str] | None = None, secret: str = SECRET) -> dict[str, Any]:
        status, answer = await self.call("POST", "/api/webhooks",
                                         {"url": url, "events": events or list(SERVICE_EVENTS), "secret": secret})
        assert (status, answer["success"]) == (201, True), answer
        return answer["data"]

    async def deliveries(self, webhook_id: str, query: str = "") -> list[dict[str, Any]]:
        status, answer = await self.call("GET", f"/api/webhooks/{webhook_id}/deliveries{query}")
        assert status == 200, answer
        return answer["data"]

    async def settled(self, webhook_id: str, count: int = 1) -> list[dict[str, Any]]:
        """The webhook's deliveries once ``count`` of them are delivered or failed."""

        async def done() -> list[dict[str, Any]] | None:
            found = await self.deliveries(webhook_id)
            return found if sum(d["status"] != "pending" for d in found) >= count else None

        return await until(done)

    async def emit(self, event: str, event_id: str, **data: Any) -> None:
        await webhooks.emit(self.ctx, event, {"eventId": event_id, "containerId": "c0ffee", **data}, event_id,
                            datetime.now(timezone.utc))


@asynccontextmanager
async def gateway(settings: Settings, runtime: Any) -> AsyncIterator[Api]:
    async with running_stack(settings, runtime, with_host=False) as stack:
        yield Api(stack)


def refused(answer: dict[str, Any], field: str) -> bool:
    """A 400 in the envelope whose fields name ``field``."""
    return answer["success"] is False and bool(answer["error"]) and any(
        f["field"] == field or f["field"].startswith(field + ".") for f in answer.get("fields", []))


def own_name_on_a_non_public_address() -> str:
    """This machine's name, which a registration cannot tell from a public one; its addresses
    (loopback, or a container's private one) are refused where it is resolved."""
    name = socket.gethostname()
    try:
        found = {info[4][0] for info in socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)}
    except OSError:
        found = set()
    if not found or any(ipaddress.ip_address(a.split("%")[0]).is_global for a in found):
        pytest.skip(f"this machine's name {name!r} does not resolve to non-public addresses only ({found})")
    return name


def signature_by_hand(key: bytes, received: Received) -> str:
    """Standard Webhooks without its library: HMAC-SHA256 over ``id.timestamp.body``, base64."""
    signed = f"{received.headers['webhook-id']}.{received.headers['webhook-timestamp']}.".encode() + received.body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# --- registration -------------------------------------------------------------------------------


async def test_register_list_get_and_delete_in_the_envelope(settings_factory: Any, runtime: Any) -> None:
    async with gateway(settings_factory(**QUICK), runtime) as api:
        assert await api.call("GET", "/api/webhooks") == (200, {"success": True, "data": []})
        url = "https://hooks.example.com/services?team=ops"
        created = await api.register(url, ["service:start", "service:error"])
        assert set(created) == {"id", "url", "events", "secretSet", "createdAt"}
        assert (created["url"], created["events"], created["secretSet"]) == (url, ["service:start", "service:error"],
                                                                               True)
        uuid.UUID(created["id"])
        other = await api.register("https://other.example.net/hook", ["service:stop"], WHSEC)

        status, listed = await api.call("GET", "/api/webhooks")
        assert status == 200 and listed["success"] is True
        assert [w["id"] for w in listed["data"]] == [created["id"], other["id"]]
        assert await api.call("GET", f"/api/webhooks/{created['id']}") == (200, {"success": True, "data": created})
        assert await api.deliveries(created["id"]) == []

        assert await api.call("DELETE", f"/api/webhooks/{created['id']}") == (200, {"success": True, "data": created})
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/deliveries")):
            status, answer = await api.call(method, f"/api/webhooks/{created['id']}{path}")
            assert (status, answer["success"], answer["code"]) == (404, False, "unknown-webhook"), (method, path)
        status, listed = await api.call("GET", "/api/webhooks")
        assert [w["id"] for w in listed["data"]] == [other["id"]]
        # No answer ever carried a secret, in either form.
        assert not any(SECRET in text or WHSEC in text or WHSEC[6:] in text for text in api.texts)


async def test_every_bad_input_is_a_400_naming_the_field(settings_factory: Any, runtime: Any) -> None:
    good = {"url": "https://hooks.example.com/x", "events": ["service:start"], "secret": SECRET}
    cases: list[tuple[Any, str]] = [
        ({**good, "url": "ftp://hooks.example.com/x"}, "url"),
        ({**good, "url": "hooks.example.com/x"}, "url"),
        ({**good, "url": "https://"}, "url"),
        ({**good, "url": "https://hooks.example.com/" + "x" * 2100}, "url"),
        ({**good, "url": "https://hooks.example.com/a b"}, "url"),
        ({**good, "url": 42}, "url"),
        ({**good, "events": ["service:explode"]}, "events"),
        ({**good, "events": []}, "events"),
        ({**good, "events": "service:start"}, "events"),
        ({**good, "events": ["service:start", "service:start"]}, "events"),
        ({**good, "secret": "short"}, "secret"),
        ({**good, "secret": "x" * 257}, "secret"),
        ({**good, "secret": "whsec_not*base64!"}, "secret"),
        ({**good, "secret": " padded-secret "}, "secret"),
        ({k: v for k, v in good.items() if k != "secret"}, "secret"),
        ({k: v for k, v in good.items() if k != "url"}, "url"),
        ({**good, "retries": 3}, "retries"),
        ("{not json", "(body)"),
        ("", "(body)"),
        ("[1, 2]", "(body)"),
    ]
    async with gateway(settings_factory(**QUICK), runtime) as api:
        for body, field in cases:
            status, answer = await api.call("POST", "/api/webhooks", body)
            assert status == 400 and refused(answer, field), (body if len(str(body)) < 200 else field, answer)
        hook = await api.register("https://hooks.example.com/x")
        for query, field in (("?limit=0", "limit"), ("?limit=501", "limit"), ("?limit=ten", "limit"),
                             ("?status=lost", "status")):
            status, answer = await api.call("GET", f"/api/webhooks/{hook['id']}/deliveries{query}")
            assert status == 400 and refused(answer, field), (query, answer)
        for method, path in (("GET", "/api/webhooks/not-an-id"), ("DELETE", "/api/webhooks/not-an-id"),
                             ("GET", "/api/webhooks/not-an-id/deliveries")):
            status, answer = await api.call(method, path)
            assert status == 400 and refused(answer, "webhookId"), (method, path, answer)
        # Nothing refused was registered.
        assert [w["id"] for w in (await api.call("GET", "/api/webhooks"))[1]["data"]] == [hook["id"]]


async def test_non_public_destinations_are_refused_unless_the_operator_allows_them(
        settings_factory: Any, runtime: Any) -> None:
    refused_urls = ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://localhost./hook",
                    "http://[::1]/hook", "http://10.0.0.5/hook", "http://192.168.1.20/hook", "http://172.17.0.1/hook",
                    "http://169.254.169.254/latest/meta-data", "http://[fe80::1]/hook", "http://0.0.0.0/hook",
                    "http://100.64.0.1/hook", "http://93.184.216.34:5672/hook", "http://93.184.216.34:15672/api"]
    async with gateway(settings_factory(webhook_retry_base_s=0.2, webhook_max_attempts=2), runtime) as api:
        for url in refused_urls:
            status, answer = await api.call("POST", "/api/webhooks", {"url": url, "events": ["service:start"],
                                                                     "secret": SECRET})
            assert status == 400 and refused(answer, "url") and answer["code"] == "destination-not-allowed", (
                url, answer)
        # A name is checked where it resolves: this machine's own name leads to a non-public
        # address, so the delivery is refused at connect time and fails at once, not retried.
        name = own_name_on_a_non_public_address()
        async with receiving(Receiver(free_port())) as receiver:
            hook = await api.register(f"http://{name}:{receiver.port}/hook")
            await api.emit("service:start", "rebound")
            [delivery] = await api.settled(hook["id"])
        assert (delivery["status"], delivery["attempts"]) == ("failed", 1), delivery
        assert delivery["lastError"].startswith("destination refused"), delivery
        assert receiver.seen == []

    # With the operator's leave, loopback 127.0.0.1 is a destination, other private ranges still are not.
    async with gateway(settings_factory(**QUICK), runtime) as api:
        await api.register("http://127.0.0.1:8080/hook")
        status, answer = await api.call("POST", "/api/webhooks", {"url": "http://10.0.0.5/hook",
                                                                 "events": ["service:start"], "secret": SECRET})
        assert status == 400 and refused(answer, "url")
        status, answer = await api.call("POST", "/api/webhooks", {"url": "http://127.0.0.1:5672/",
                                                                 "events": ["service:start"], "secret": SECRET})
        assert status == 400 and "broker" in answer["error"]


# --- delivery ----------------------------------------------------------------------------------


async def test_deliveries_are_signed_filtered_by_event_and_queued_once(settings_factory: Any, runtime: Any,
                                                                       capfd: pytest.CaptureFixture[str]) -> None:
    async with gateway(settings_factory(**QUICK), runtime) as api, receiving(Receiver(free_port())) as receiver:
        plain = await api.register(receiver.url + "?as=plain", ["service:start", "service:error"], SECRET)
        base64_form = await api.register(receiver.url + "?as=whsec", ["service:start"], WHSEC)

        # Not subscribed by either: never queued. Then one both want, emitted twice (as two
        # gateways would), and one only the first wants.
        await api.emit("service:stop", "e-stop")
        await api.emit("service:start", "e-start", name="web")
        await api.emit("service:start", "e-start", name="web")
        await api.emit("service:error", "e-error", reason="crash")
        seen = await receiver.wait_for(lambda s: len(s) >= 3)
        await api.settled(plain["id"], 2)
        await api.settled(base64_form["id"], 1)
        assert sorted(receiver.events()) == ["e-error", "e-start", "e-start"]

        for received in seen:
            headers = received.headers
            secret = SECRET if headers["webhook-id"] in {d["id"] for d in await api.deliveries(plain["id"])} else WHSEC
            key = secret.encode() if secret == SECRET else base64.b64decode(WHSEC[len("whsec_"):])
            # The library's check (a plain secret is its UTF-8 bytes; a whsec_ one as given), and
            # the scheme written out by hand.
            assert Verifier(key).verify(received.body, headers)["type"] in ("service:start", "service:error")
            if secret == WHSEC:
                assert Verifier(WHSEC).verify(received.body, headers)["type"] == "service:start"
            assert headers["webhook-signature"] == signature_by_hand(key, received)
            assert headers["content-type"] == "application/json"
            assert abs(int(headers["webhook-timestamp"]) - datetime.now(timezone.utc).timestamp()) < 300
            assert set(received.json) == {"type", "timestamp", "data"}
            datetime.fromisoformat(received.json["timestamp"].replace("Z", "+00:00"))
        start = next(r.json for r in seen if r.json["type"] == "service:start")
        assert start["data"] == {"eventId": "e-start", "containerId": "c0ffee", "name": "web"}

        [error, started] = await api.deliveries(plain["id"])  # newest first
        assert (error["event"], error["eventId"], started["event"], started["eventId"]) == (
            "service:error", "e-error", "service:start", "e-start")
        assert (started["status"], started["attempts"], started["lastStatusCode"]) == ("delivered", 1, 200)
        assert started["deliveredAt"] is not None and started["nextAttemptAt"] is None
        assert started["payload"]["data"]["name"] == "web" and started["lastError"] is None
        assert [a["statusCode"] for a in started["history"]] == [200]
        assert [d["eventId"] for d in await api.deliveries(plain["id"], "?status=delivered&limit=1")] == ["e-error"]
        assert await api.deliveries(plain["id"], "?status=failed") == []
        assert [d["eventId"] for d in await api.deliveries(base64_form["id"])] == ["e-start"]
        # A signature a wrong key made does not verify.
        with pytest.raises(Exception, match="signature"):
            Verifier(b"not-the-secret").verify(seen[0].body, seen[0].headers)

    assert not any(SECRET in text or WHSEC in text for text in api.texts)
    logged = capfd.readouterr()
    assert SECRET not in logged.out + logged.err and WHSEC not in logged.out + logged.err


async def test_a_failed_attempt_is_retried_under_the_same_id_until_attempts_run_out(
        settings_factory: Any, runtime: Any) -> None:
    async with gateway(settings_factory(**QUICK), runtime) as api:
        async with receiving(Receiver(free_port(), answers=[500, 503])) as flaky, \
                receiving(Receiver(free_port(), answers=[500] * 10)) as broken:
            recovering = await api.register(flaky.url, ["service:restart"])
            hopeless = await api.register(broken.url, ["service:restart"])
            await api.emit("service:restart", "e-restart")
            tries = await flaky.wait_for(lambda s: len(s) >= 3)
            [delivery] = await api.settled(recovering["id"])
            [gave_up] = await api.settled(hopeless["id"])

        assert len({r.headers["webhook-id"] for r in tries}) == 1 and tries[0].headers["webhook-id"] == delivery["id"]
        assert len({r.body for r in tries}) == 1  # the same body every time
        assert (delivery["status"], delivery["attempts"], delivery["lastStatusCode"]) == ("delivered", 3, 200)
        assert [(a["attempt"], a["statusCode"]) for a in delivery["history"]] == [(1, 500), (2, 503), (3, 200)]
        assert delivery["history"][0]["error"] == "answered HTTP 500"
        assert all(a["durationMs"] >= 0 for a in delivery["history"])

        assert (gave_up["status"], gave_up["attempts"], gave_up["nextAttemptAt"]) == ("failed", 4, None)
        assert [a["statusCode"] for a in gave_up["history"]] == [500] * 4 and len(broken.seen) == 4
        assert gave_up["lastStatusCode"] == 500 and gave_up["deliveredAt"] is None
        # Backoff: each wait at least the schedule's, which doubles (0.2 s, 0.4 s, 0.8 s).
        begun = [datetime.fromisoformat(a["at"].replace("Z", "+00:00")) for a in gave_up["history"]]
        gaps = [(later - earlier).total_seconds() for earlier, later in zip(begun, begun[1:])]
        assert all(gap >= wait - 0.01 for gap, wait in zip(gaps, (0.2, 0.4, 0.8))), gaps


async def test_deliveries_survive_a_gateway_restart(settings_factory: Any, runtime: Any) -> None:
    settings = settings_factory(**{**QUICK, "webhook_max_attempts": 30})
    receiver = Receiver(free_port())
    async with gateway(settings, runtime) as api:
        hook = await api.register(receiver.url, ["service:update"])
        await api.emit("service:update", "e-update", version="1.0.1")

        async def tried() -> dict[str, Any] | None:  # the receiver is down: refused, still pending
            [delivery] = await api.deliveries(hook["id"])
            return delivery if delivery["attempts"] >= 1 else None

        before = await until(tried)
        assert before["status"] == "pending" and "Connect" in before["lastError"], before

    # A new gateway on the same store; the receiver comes up after it.
    async with gateway(settings, runtime) as api, receiving(receiver):
        [arrived] = await receiver.wait_for(lambda s: len(s) >= 1)
        [delivery] = await api.settled(hook["id"])
        assert arrived.headers["webhook-id"] == delivery["id"] == before["id"]
        assert arrived.json["data"]["version"] == "1.0.1"
        assert delivery["status"] == "delivered" and delivery["attempts"] > before["attempts"]
        assert Verifier(SECRET.encode()).verify(arrived.body, arrived.headers)


async def test_two_gateways_on_one_postgresql_store_send_each_delivery_once(settings_factory: Any,
                                                                            runtime: Any) -> None:
    """Both gateways see every event and emit it; both loops claim from the same rows. The
    receiver answers slowly, so claims overlap: still one delivery per event, sent once."""
    async with fresh_postgres_database() as url:
        settings = [settings_factory(**QUICK, database_url=url, gateway_id=f"gw-{name}") for name in "ab"]
        receiver = Receiver(free_port())
        slow = receiver.handle

        async def handle(request: web.Request) -> web.Response:
            await asyncio.sleep(0.05)
            return await slow(request)

        receiver.handle = handle  # type: ignore[method-assign]
        async with gateway(settings[0], runtime) as a, gateway(settings[1], runtime) as b, receiving(receiver):
            hook = await a.register(receiver.url, ["service:start"])
            ids = [f"e-{n}" for n in range(40)]
            for event_id in ids:
                await asyncio.gather(a.emit("service:start", event_id), b.emit("service:start", event_id))
            await receiver.wait_for(lambda s: len(s) >= len(ids))
            found = await b.settled(hook["id"], len(ids))
        assert sorted(receiver.events()) == sorted(ids)
        assert len({r.headers["webhook-id"] for r in receiver.seen}) == len(ids)
        assert {d["status"] for d in found} == {"delivered"} and {d["attempts"] for d in found} == {1}
