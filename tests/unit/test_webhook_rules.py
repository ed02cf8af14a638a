"""Webhooks' rules without a gateway: the retry schedule, where a delivery may go, what a
registration accepts, how a delivery is signed, and the store's leases (on SQLite and a real
PostgreSQL), which keep two gateways from sending one delivery at the same time."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook as Verifier

from bees.http import RefusedDestination, guarded_connector
from controlplane.config import Settings
from controlplane.contract.webhooks import SERVICE_EVENTS, WebhookCreate, signing_key
from controlplane.gateway.surfaces.services import webhooks
from controlplane.store import Store, open_store
from controlplane.store import webhooks as rows
from tests.conftest import fresh_postgres_database

T0 = datetime(2025, 5, 5, 10, 0, tzinfo=timezone.utc)
GOOD = {"url": "https://hooks.example.com/x", "events": ["service:start"], "secret": "s3cret-value"}


def settings(**overrides: Any) -> Settings:
    return Settings(**{"webhook_retry_base_s": 5.0, "webhook_retry_max_s": 60.0, "webhook_max_attempts": 6,
                       **overrides})


# --- the schedule --------------------------------------------------------------------------------


def test_retry_delays_double_from_the_first_up_to_the_cap() -> None:
    assert [webhooks.retry_delay(n, 5.0, 60.0) for n in range(1, 8)] == [5, 10, 20, 40, 60, 60, 60]
    assert webhooks.retry_delay(10_000, 5.0, 3600.0) == 3600.0  # no overflow however many attempts
    assert webhooks.retry_delay(1, 5.0, 2.0) == 2.0  # a cap below the first delay wins


def test_after_an_attempt_delivered_due_again_or_failed() -> None:
    s = settings()
    assert webhooks.after_attempt(1, True, False, s, T0) == ("delivered", None)
    assert webhooks.after_attempt(1, False, False, s, T0) == ("pending", T0 + timedelta(seconds=5))
    assert webhooks.after_attempt(3, False, False, s, T0) == ("pending", T0 + timedelta(seconds=20))
    assert webhooks.after_attempt(6, False, False, s, T0) == ("failed", None)  # the last one allowed
    assert webhooks.after_attempt(1, False, True, s, T0) == ("failed", None)  # refused: no retry
    assert webhooks.after_attempt(1, False, False, settings(webhook_max_attempts=1), T0) == ("failed", None)


# --- where deliveries may go -----------------------------------------------------------------


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/", "loopback"), ("http://127.8.9.10:8080/", "loopback"), ("http://[::1]:9000/", "loopback"),
    ("http://localhost/", "loopback"), ("http://localhost./", "loopback"), ("http://api.localhost/", "loopback"),
    ("http://10.1.2.3/", "private"), ("http://172.16.0.1/", "private"), ("http://192.168.0.10/", "private"),
    ("http://[fd00::1]/", "private"), ("http://0.0.0.0/", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"), ("http://[fe80::1]/", "link-local"),
    ("http://100.64.0.1/", "not a public address"),
    ("http://93.184.216.34:5672/", "broker"), ("https://hooks.example.com:15672/", "broker"),
])
def test_non_public_destinations_and_broker_ports_are_refused(url: str, reason: str) -> None:
    problem = webhooks.egress_of(settings()).destination_problem(url)
    assert problem is not None and reason in problem


def test_public_destinations_pass_and_names_wait_for_their_addresses() -> None:
    egress = webhooks.egress_of(settings())
    for url in ("https://hooks.example.com/x", "http://93.184.216.34/", "https://[2606:2800:220:1::]/",
                "http://internal.corp.example:8080/"):  # a name is checked where it resolves
        assert egress.destination_problem(url) is None, url


def test_the_operator_allows_addresses_and_networks_not_the_broker() -> None:
    egress = webhooks.egress_of(settings(webhook_allowed_targets=["127.0.0.1", "10.0.0.0/8", "192.168.1.5:8443"]))
    assert egress.destination_problem("http://127.0.0.1:8080/") is None
    assert egress.destination_problem("http://localhost:8080/") is None  # it resolves there
    assert egress.destination_problem("http://10.20.30.40/") is None
    assert egress.destination_problem("https://192.168.1.5:8443/") is None
    assert "private" in (egress.destination_problem("https://192.168.1.5:9000/") or "")
    assert "loopback" in (egress.destination_problem("http://127.0.0.2/") or "")
    assert "broker" in (egress.destination_problem("http://127.0.0.1:5672/") or "")


def test_the_setting_refuses_what_is_not_a_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_WEBHOOK_ALLOWED_TARGETS", '["127.0.0.1", "10.0.0.0/8"]')
    assert Settings().webhook_allowed_targets == ["127.0.0.1", "10.0.0.0/8"]
    for bad in ('["host:port"]', '[":80"]'):
        monkeypatch.setenv("CP_WEBHOOK_ALLOWED_TARGETS", bad)
        with pytest.raises(ValidationError, match="webhook_allowed_targets"):
            Settings()
    with pytest.raises(ValidationError, match="webhook_max_attempts"):
        Settings(webhook_max_attempts=0)


async def test_a_name_that_resolves_to_a_refused_address_is_refused_at_connect_time() -> None:
    """What a rebound name meets: the connector's resolver drops every refused address, and the
    attempt counts as refused (no retry), unlike a connection that simply fails."""
    egress = webhooks.egress_of(settings())
    async with aiohttp.ClientSession(connector=guarded_connector(egress)) as http:
        with pytest.raises(aiohttp.ClientError) as caught:
            await http.post("http://localhost:9/hook", data=b"{}")
        assert webhooks._refused(caught.value)
        assert isinstance(caught.value.__cause__, RefusedDestination)
    allowed = webhooks.egress_of(settings(webhook_allowed_targets=["127.0.0.1"]))
    async with aiohttp.ClientSession(connector=guarded_connector(allowed)) as http:
        with pytest.raises(aiohttp.ClientError) as caught:
            await http.post("http://localhost:9/hook", data=b"{}")  # allowed, but nobody listens
        assert not webhooks._refused(caught.value)


# --- registrations ---------------------------------------------------------------------------


def test_a_registration_is_checked_field_by_field() -> None:
    hook = WebhookCreate.model_validate({**GOOD, "events": list(SERVICE_EVENTS)})
    assert hook.events == list(SERVICE_EVENTS) and GOOD["secret"] not in repr(hook)
    cases = [({**GOOD, "events": ["service:start", "service:start"]}, "events"),
             ({**GOOD, "events": ["service:boot"]}, "events"), ({**GOOD, "events": []}, "events"),
             ({**GOOD, "url": "mailto:ops@example.com"}, "url"), ({**GOOD, "url": "https://ex ample.com/"}, "url"),
             ({**GOOD, "url": "https://example.com/#frag"}, "url"), ({**GOOD, "secret": "1234567"}, "secret"),
             ({**GOOD, "secret": "whsec_c2hvcnQ="}, "secret"), ({**GOOD, "secret": "whsec_%%%%%%%%%%"}, "secret"),
             ({**GOOD, "Secret": "x" * 8}, "Secret")]
    for body, field in cases:
        with pytest.raises(ValidationError) as caught:
            WebhookCreate.model_validate(body)
        assert [e["loc"][0] for e in caught.value.errors()] == [field], body


def test_a_whsec_secret_is_base64_any_other_is_its_bytes() -> None:
    key = b"\x00\x01 a key of binary bytes \xff\xfe"
    whsec = "whsec_" + base64.b64encode(key).decode()
    assert signing_key(whsec) == key
    assert signing_key(whsec.rstrip("=")) == key  # unpadded, as some providers write it
    assert signing_key("plain-secret") == b"plain-secret"
    assert WebhookCreate.model_validate({**GOOD, "secret": whsec}).secret == whsec


@pytest.mark.parametrize("secret, key", [
    ("plain-secret", b"plain-secret"),
    ("whsec_" + base64.b64encode(b"0123456789abcdef0123").decode(), b"0123456789abcdef0123"),
])
def test_signed_headers_verify_with_the_library_and_by_hand(secret: str, key: bytes) -> None:
    body = webhooks.payload("service:stop", {"containerId": "abc"}, T0)
    at = int(datetime.now(timezone.utc).timestamp())
    headers = webhooks.signed_headers("msg_1", secret, body, at)
    assert (headers["webhook-id"], headers["webhook-timestamp"]) == ("msg_1", str(at))
    assert headers["content-type"] == "application/json"
    assert Verifier(key).verify(body, headers) == json.loads(body)
    mac = hmac.new(key, f"msg_1.{at}.{body}".encode(), hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()


def test_the_payload_is_type_timestamp_data_with_secrets_masked() -> None:
    body = json.loads(webhooks.payload("service:start", {"name": "web", "env": {"DB_PASSWORD": "x"},
                                                         "apiKey": "k"}, T0))
    assert body == {"type": "service:start", "timestamp": "2025-05-05T10:00:00Z",
                    "data": {"name": "web", "env": {"DB_PASSWORD": "***"}, "apiKey": "***"}}


def test_long_event_ids_are_digested_and_passwords_in_urls_masked() -> None:
    assert webhooks.event_key("abc") == "abc"
    long = "x" * 500
    assert webhooks.event_key(long).startswith("sha256:") and len(webhooks.event_key(long)) < 255
    assert webhooks.event_key(long) == webhooks.event_key(long)
    assert webhooks.shown_url("https://ops:hunter22@hooks.example.com/x") == "https://ops:***@hooks.example.com/x"
    assert webhooks.shown_url("https://hooks.example.com/x?a=1") == "https://hooks.example.com/x?a=1"


# --- the store's leases ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def two_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database, as two gateways would have."""

    async def opened(url: str) -> AsyncIterator[tuple[Store, Store]]:
        first = await open_store(url)
        second = await open_store(url)
        try:
            yield first, second
        finally:
            await first.close()
            await second.close()

    if request.param == "sqlite":
        async for pair in opened(f"sqlite:///{tmp_path / 'store.db'}"):
            yield pair
        return
    async with fresh_postgres_database() as url:
        async for pair in opened(url):
            yield pair


def attempted(delivery_id: str, lease: str, status: str, code: int, next_at: datetime | None,
              at: datetime) -> rows.Attempted:
    """A first attempt's outcome, answered ``code``."""
    entry = {"attempt": 1, "at": at.isoformat(), "statusCode": code, "error": None, "durationMs": 1.0}
    return rows.Attempted(delivery_id, lease, status, 1, [entry], code, None, next_at, at)


async def add_hook(store: Store, events: list[str], hook_id: str = "00000000-0000-0000-0000-000000000001") -> None:
    assert await store.add_webhook(rows.Webhook(hook_id, "https://hooks.example.com/x", events, T0, "secret-1"), 10)


async def test_an_event_is_queued_once_per_webhook_subscribed(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    await add_hook(a, ["service:start"])
    await add_hook(a, ["service:start", "service:stop"], "00000000-0000-0000-0000-000000000002")
    queued = await asyncio.gather(a.queue_webhook_deliveries("service:start", "e1", "{}", T0),
                                  b.queue_webhook_deliveries("service:start", "e1", "{}", T0))
    assert sorted(queued) == [0, 2]  # whoever came second found both queued
    assert await a.queue_webhook_deliveries("service:stop", "e2", "{}", T0 + timedelta(seconds=1)) == 1
    assert await a.queue_webhook_deliveries("service:error", "e3", "{}", T0) == 0
    assert [d["event_id"] for d in await a.webhook_deliveries("00000000-0000-0000-0000-000000000002", None, 10)] \
        == ["e2", "e1"]


async def test_two_claimers_never_hold_one_delivery_and_a_lapsed_lease_is_taken_over(
        two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    await add_hook(a, ["service:start"])
    for n in range(30):
        await a.queue_webhook_deliveries("service:start", f"e{n}", "{}", T0)
    now, until = T0 + timedelta(seconds=1), T0 + timedelta(seconds=31)
    (mine, _), (theirs, _) = await asyncio.gather(
        *(store.claim_webhook_deliveries(lease, now, until, 20) for store, lease in ((a, "gw-a/1"), (b, "gw-b/1"))))
    assert len(mine) + len(theirs) == 30 and not {d.id for d in mine} & {d.id for d in theirs}
    assert (await a.claim_webhook_deliveries("gw-a/1", now, until, 20)) == ([], until)  # all leased until then

    first = mine[0]
    retry_at = now + timedelta(seconds=5)
    # Only the lease holder records; it frees the delivery for its retry.
    assert not await b.record_webhook_attempt(attempted(first.id, "gw-b/1", "pending", 500, retry_at, now))
    assert await a.record_webhook_attempt(attempted(first.id, first.lease, "pending", 500, retry_at, now))
    again, next_due = await b.claim_webhook_deliveries("gw-b/2", retry_at, until + timedelta(seconds=10), 5)
    assert [d.id for d in again] == [first.id] and next_due == until
    assert again[0].attempts == 1 and [h["statusCode"] for h in again[0].history] == [500]

    # A gateway that died: its leases lapse and anyone takes them over; the late one cannot record.
    late, _ = await b.claim_webhook_deliveries("gw-b/2", until, until + timedelta(seconds=30), 50)
    assert len(late) == 29 and first.id not in {d.id for d in late}
    assert not await a.record_webhook_attempt(attempted(mine[1].id, "gw-a/1", "delivered", 200, None, until))
    # A gateway stopping gives its leases back at once.
    assert await b.release_webhook_leases("gw-b/2", until) == 30
    assert len((await a.claim_webhook_deliveries("gw-a/3", until, until + timedelta(seconds=30), 50))[0]) == 30


async def test_removing_a_webhook_drops_its_deliveries_and_old_ones_are_purged(
        two_stores: tuple[Store, Store]) -> None:
    a, _ = two_stores
    hook_id = "00000000-0000-0000-0000-000000000001"
    await add_hook(a, ["service:start"], hook_id)
    assert not await a.add_webhook(rows.Webhook("x", "https://h.example/", ["service:start"], T0, "secret-2"), 1)
    await a.queue_webhook_deliveries("service:start", "e1", "{}", T0)
    await a.queue_webhook_deliveries("service:start", "e2", "{}", T0)
    [d1, d2], _ = await a.claim_webhook_deliveries("l/1", T0, T0 + timedelta(seconds=30), 5)
    assert await a.record_webhook_attempt(attempted(d1.id, "l/1", "delivered", 200, None, T0))
    assert await a.purge_webhook_deliveries(T0 + timedelta(days=1)) == 1  # the finished one only
    assert [d["id"] for d in await a.webhook_deliveries(hook_id, None, 10)] == [d2.id]
    assert await a.remove_webhook(hook_id) and not await a.remove_webhook(hook_id)
    assert await a.webhook_deliveries(hook_id, None, 10) == [] and await a.get_webhook(hook_id) is None
