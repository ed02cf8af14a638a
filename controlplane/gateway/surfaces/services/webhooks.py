"""Webhooks of the services surface: registrations under ``/api/webhooks``, and the delivery
of service events to them as signed HTTP requests (Standard Webhooks).

``emit`` queues one delivery per subscribed webhook in the store, where the (webhook, event
id) pair is unique: every gateway that sees an event may emit it, one delivery is made. Each
gateway runs a delivery loop (``start``/``stop``) that leases due deliveries from the store,
so gateways sharing a database never send one delivery at the same time, and one that dies
leaves its deliveries to whoever finds them due after the lease. A delivery keeps its id as
``webhook-id`` across retries, so a receiver can drop a repeat.

Where a delivery may go is decided twice with the egress rules (``contract.egress``): at
registration (a loopback, link-local, private or otherwise non-public address, or the
broker's ports) and at connect time (every address a name resolves to), unless the operator
lists the address (``CP_WEBHOOK_ALLOWED_TARGETS``). The secret signs; no answer shows it and
no log line carries it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Histogram
from standardwebhooks.webhooks import Webhook as Signer
from yarl import URL

from bees.http import RefusedDestination, guarded_connector
from controlplane.aio import wait_set
from controlplane.config import Settings
from controlplane.contract.egress import Egress
from controlplane.contract.models import new_id, utcnow
from controlplane.contract.redact import redact, safe_text
from controlplane.contract.webhooks import (
    DELIVERY_STATUSES, SERVICE_EVENTS, DeliveryView, WebhookCreate, WebhookView, signing_key,
)
from controlplane.gateway.context import GatewayContext, context_of
from controlplane.gateway.middleware import ApiError, read_json
from controlplane.gateway.openapi import Op
from controlplane.gateway.surface import Handler
from controlplane.gateway.surfaces.services.envelope import ok
from controlplane.logs import get_logger, mask_url
from controlplane.store import webhooks as rows

log = get_logger("gateway.webhooks")

NAME = "services.webhooks"
MAX_WEBHOOKS = 100
DELIVERIES_LIMIT_DEFAULT, DELIVERIES_LIMIT_MAX = 50, 500
# Deliveries queued by another gateway, and leases that lapsed, are found within this.
POLL_S = 1.0
MIN_WAIT_S = 0.02
# A claim outlives the attempt's timeout by this much before another gateway may take it over.
LEASE_MARGIN_S = 30.0
# How long stopping waits for the attempts in flight before it cancels them.
STOP_GRACE_S = 5.0
RETENTION_INTERVAL_S = 3600.0
RESPONSE_READ_LIMIT = 64 * 1024  # of a receiver's answer, read so its connection can be reused
USER_AGENT = "controlplane-webhooks/1"

ATTEMPTS = Counter("cp_webhook_attempts", "Webhook delivery attempts by how they ended", ["result"])
ATTEMPT_SECONDS = Histogram("cp_webhook_attempt_seconds", "One webhook delivery attempt, from connect to answer",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
for _result in ("delivered", "retry", "failed"):
    ATTEMPTS.labels(_result)


# --- the schedule and the destination rules (no I/O) -----------------------------------------


def retry_delay(made: int, base_s: float, max_s: float) -> float:
    """Seconds before the next attempt once ``made`` attempts failed: base, twice that, four
    times..., never more than ``max_s``."""
    return min(max_s, base_s * 2.0 ** min(made - 1, 64))


def after_attempt(made: int, delivered: bool, refused: bool, settings: Settings,
                  now: datetime) -> tuple[str, datetime | None]:
    """The delivery's status once its ``made``-th attempt ended, and when it is due again. A
    destination the egress rules refuse fails at once: retrying cannot change a policy."""
    if delivered:
        return rows.DELIVERED, None
    if refused or made >= settings.webhook_max_attempts:
        return rows.FAILED, None
    delay = retry_delay(made, settings.webhook_retry_base_s, settings.webhook_retry_max_s)
    return rows.PENDING, now + timedelta(seconds=delay)


def egress_of(settings: Settings) -> Egress:
    """Any public destination; the non-public ones the operator lists; never the broker."""
    return Egress.of(None, settings.webhook_allowed_targets)


def signed_headers(delivery_id: str, secret: str, body: str, at: int) -> dict[str, str]:
    """Standard Webhooks headers for one attempt at epoch second ``at``."""
    signature = Signer(signing_key(secret)).sign(delivery_id, datetime.fromtimestamp(at, timezone.utc), body)
    return {"webhook-id": delivery_id, "webhook-timestamp": str(at), "webhook-signature": signature,
            "content-type": "application/json", "user-agent": USER_AGENT}


def payload(event: str, data: dict[str, Any], at: datetime) -> str:
    """The body every attempt sends, as Standard Webhooks shapes it. Secrets in ``data`` are
    masked: a receiver is a reader like any other."""
    stamp = (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    return json.dumps({"type": event, "timestamp": stamp.isoformat().replace("+00:00", "Z"), "data": redact(data)},
                      separators=(",", ":"), default=str)


def event_key(event_id: str) -> str:
    """An event id the store can index: a long one is replaced by its digest."""
    return event_id if len(event_id) <= 200 else "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()


def shown_url(url: str) -> str:
    """A webhook's URL as answers show it: a password in it masked."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


# --- state ------------------------------------------------------------------------------------


@dataclass
class WebhooksState:
    """This gateway's part: its rules, its lease name, and the loop that sends."""

    egress: Egress
    lease: str  # "<gateway>/<process>": a restart of the same gateway takes its predecessor's back
    concurrency: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    asleep_until: datetime | None = None  # when the loop wakes by itself next; None: it is awake
    http: aiohttp.ClientSession | None = None
    loop: asyncio.Task[None] | None = None
    retention: asyncio.Task[None] | None = None
    sending: set[asyncio.Task[None]] = field(default_factory=set)


def state_of(ctx: GatewayContext) -> WebhooksState:
    state = ctx.surfaces.get(NAME)
    if state is None:  # emit may come before load: a projection runs as soon as events flow
        state = ctx.surfaces[NAME] = WebhooksState(egress_of(ctx.settings),
                                                   f"{ctx.settings.gateway_name}/{uuid.uuid4().hex}",
                                                   ctx.settings.webhook_concurrency)
    return state


def _gateway_prefix(settings: Settings) -> str:
    return f"{settings.gateway_name}/"


# --- routes -----------------------------------------------------------------------------------


def routes(op: Callable[..., Op]) -> tuple[tuple[Op, Handler], ...]:
    one = (200, 400, 404)
    return (
        (op("POST", "/webhooks", "Register a webhook: service events POSTed to its URL, signed with its secret",
            body=WebhookCreate, statuses=(201, 400, 409), mutating=True), create_webhook),
        (op("GET", "/webhooks", "Every webhook (never its secret)"), list_webhooks),
        (op("GET", "/webhooks/{webhookId}", "One webhook", statuses=one), get_webhook),
        (op("DELETE", "/webhooks/{webhookId}", "Remove a webhook; its pending deliveries are not sent",
            statuses=one, mutating=True), delete_webhook),
        (op("GET", "/webhooks/{webhookId}/deliveries", "A webhook's deliveries and their attempts, newest first",
            statuses=one, query=("limit", "status")), list_deliveries),
    )


def _view(hook: rows.Webhook) -> dict[str, Any]:
    return WebhookView(id=hook.id, url=shown_url(hook.url), events=hook.events, created_at=hook.created_at).to_dict()


def _field_error(field_name: str, reason: str, code: str = "invalid-request", status: int = 400) -> ApiError:
    return ApiError(status, code, f"{field_name}: {reason}", [{"field": field_name, "reason": reason}])


async def create_webhook(request: web.Request) -> web.Response:
    ctx = context_of(request)
    body = WebhookCreate.model_validate(await read_json(request))
    problem = state_of(ctx).egress.destination_problem(body.url)
    if problem:
        raise _field_error("url", f"not allowed: {problem} (an operator may allow an address or network in "
                                  "CP_WEBHOOK_ALLOWED_TARGETS)", code="destination-not-allowed")
    hook = rows.Webhook(id=new_id(), url=body.url, events=list(body.events), created_at=utcnow(), secret=body.secret)
    if not await ctx.store.add_webhook(hook, MAX_WEBHOOKS):
        raise ApiError(409, "webhook-limit", f"{MAX_WEBHOOKS} webhooks exist already; remove one first")
    log.info("webhook registered", webhook_id=hook.id, events=hook.events)
    return ok(_view(hook), 201)


async def list_webhooks(request: web.Request) -> web.Response:
    return ok([_view(hook) for hook in await context_of(request).store.list_webhooks()])


def _webhook_id(request: web.Request) -> str:
    raw = request.match_info["webhookId"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise _field_error("webhookId", "must be a webhook id (a UUID)") from None


async def _require(ctx: GatewayContext, webhook_id: str) -> rows.Webhook:
    hook = await ctx.store.get_webhook(webhook_id)
    if hook is None:
        raise ApiError(404, "unknown-webhook", f"no webhook {webhook_id}")
    return hook


async def get_webhook(request: web.Request) -> web.Response:
    return ok(_view(await _require(context_of(request), _webhook_id(request))))


async def delete_webhook(request: web.Request) -> web.Response:
    ctx = context_of(request)
    hook = await _require(ctx, _webhook_id(request))
    if not await ctx.store.remove_webhook(hook.id):
        raise ApiError(404, "unknown-webhook", f"no webhook {hook.id}")
    log.info("webhook removed", webhook_id=hook.id)
    return ok(_view(hook))


def _limit(raw: str | None) -> int:
    if raw is None:
        return DELIVERIES_LIMIT_DEFAULT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= DELIVERIES_LIMIT_MAX:
        raise _field_error("limit", f"must be an integer from 1 to {DELIVERIES_LIMIT_MAX}")
    return limit


async def list_deliveries(request: web.Request) -> web.Response:
    ctx = context_of(request)
    webhook_id = _webhook_id(request)
    limit = _limit(request.query.get("limit"))
    status = request.query.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise _field_error("status", f"must be one of {', '.join(DELIVERY_STATUSES)}")
    await _require(ctx, webhook_id)
    found = await ctx.store.webhook_deliveries(webhook_id, status, limit)
    return ok([delivery_view(row) for row in found])


def delivery_view(row: dict[str, Any]) -> dict[str, Any]:
    return DeliveryView(
        id=row["id"], webhook_id=row["webhook_id"], event=row["event"], event_id=row["event_id"],
        status=row["status"], attempts=row["attempts"], last_status_code=row["last_status_code"],
        last_error=row["last_error"], next_attempt_at=row["next_attempt_at"], created_at=row["created_at"],
        delivered_at=row["delivered_at"], payload=json.loads(row["body"]), history=row["history"],
    ).view()


# --- events in ---------------------------------------------------------------------------------


async def emit(ctx: GatewayContext, event: str, data: dict[str, Any], event_id: str, at: datetime) -> None:
    """Queue ``event`` (``service:start``...) for every webhook subscribed to it, once per
    ``event_id`` whichever gateways emit it; durable when this returns (raises when the store
    cannot take it). The delivery loop is woken at once, not at its next poll."""
    if event not in SERVICE_EVENTS:
        log.warning("webhook event ignored: not a service event", event=event)
        return
    queued = await ctx.store.queue_webhook_deliveries(event, event_key(event_id), payload(event, data, at), utcnow())
    if queued:
        state_of(ctx).wake.set()


# --- the delivery loop --------------------------------------------------------------------------


async def load(ctx: GatewayContext) -> None:
    state_of(ctx)


async def start(ctx: GatewayContext) -> None:
    state = state_of(ctx)
    if state.loop is not None:
        return
    settings = ctx.settings
    # The connector resolves every name through the egress rules, at each connection.
    state.http = aiohttp.ClientSession(
        connector=guarded_connector(state.egress, limit=settings.webhook_concurrency),
        timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_s), cookie_jar=aiohttp.DummyCookieJar())
    try:
        # A predecessor of this gateway that died: its leases are this gateway's to resume now.
        await ctx.store.release_webhook_leases(_gateway_prefix(settings), utcnow())
    except Exception as exc:  # they lapse by themselves
        log.warning("webhook leases not released", error=repr(exc))
    state.loop = asyncio.create_task(_deliver(ctx, state), name="webhooks.deliver")
    state.retention = asyncio.create_task(_retain(ctx), name="webhooks.retention")


async def stop(ctx: GatewayContext) -> None:
    state: WebhooksState | None = ctx.surfaces.get(NAME)
    if state is None:
        return
    for task in (state.loop, state.retention):
        if task is not None:
            task.cancel()
    await asyncio.gather(*(t for t in (state.loop, state.retention) if t is not None), return_exceptions=True)
    state.loop = state.retention = None
    if state.sending:
        _, late = await asyncio.wait(set(state.sending), timeout=STOP_GRACE_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    try:
        # What this gateway leased and did not finish is due again now, for whoever runs next.
        await ctx.store.release_webhook_leases(state.lease, utcnow())
    except Exception as exc:
        log.warning("webhook leases not released", error=repr(exc))
    if state.http is not None:
        await state.http.close()
        state.http = None


async def _deliver(ctx: GatewayContext, state: WebhooksState) -> None:
    """Claim what is due (as much as there is room for), send each in a task of its own, sleep
    until the next is due, a poll, or a wake: an emit, half the room free again, or a retry
    due before the loop would wake."""
    settings = ctx.settings
    lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
    while True:
        state.wake.clear()
        state.asleep_until = None  # a retry recorded from now on may be missed by this claim's next due
        delay = POLL_S
        room = state.concurrency - len(state.sending)
        if room > 0:
            now = utcnow()
            try:
                claimed, next_due = await ctx.store.claim_webhook_deliveries(
                    state.lease, now, now + timedelta(seconds=lease_s), room)
            except Exception as exc:
                log.warning("webhook deliveries not claimed", error=repr(exc))
                claimed, next_due = [], None
            for delivery in claimed:
                task = asyncio.create_task(_attempt(ctx, state, delivery), name=f"webhooks.send.{delivery.id}")
                state.sending.add(task)
                task.add_done_callback(partial(_sent, state))
            if len(claimed) < room and next_due is not None:
                delay = min(POLL_S, max(MIN_WAIT_S, (next_due - utcnow()).total_seconds()))
        state.asleep_until = utcnow() + timedelta(seconds=delay)
        await wait_set(state.wake, delay)


def _sent(state: WebhooksState, task: asyncio.Task[None]) -> None:
    """An attempt ended. The loop claims again once half the room is free: one claim for many
    deliveries, rather than one for each."""
    state.sending.discard(task)
    if len(state.sending) <= state.concurrency // 2:
        state.wake.set()


def _refused(exc: BaseException) -> bool:
    """Whether the egress rules, not the network, stopped the attempt."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, RefusedDestination):
            return True
        todo += [item.__cause__, item.__context__, getattr(item, "os_error", None)]
    return False


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    text = str(exc) or type(exc).__name__
    return safe_text(mask_url(f"{type(exc).__name__}: {text}"), limit=400)


async def _attempt(ctx: GatewayContext, state: WebhooksState, delivery: rows.Claimed) -> None:
    """One attempt: sign, POST, record the outcome while the lease holds."""
    settings = ctx.settings
    begun = utcnow()
    started = time.perf_counter()
    status_code: int | None = None
    error: str | None = None
    refused = False
    try:
        # Addresses in the URL itself never reach the resolver: checked here, against today's rules.
        problem = state.egress.destination_problem(delivery.url)
        if problem:
            raise RefusedDestination(problem)
        if state.http is None:
            raise RuntimeError("the webhooks' HTTP client is closed")
        headers = signed_headers(delivery.id, delivery.secret, delivery.body, int(begun.timestamp()))
        async with state.http.post(delivery.url, data=delivery.body.encode(), allow_redirects=False,
                                   headers=headers) as resp:
            status_code = resp.status
            await resp.content.read(RESPONSE_READ_LIMIT)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        refused = _refused(exc)
        error = ("destination refused: " if refused else "") + _describe(exc, settings.webhook_timeout_s)
    elapsed = time.perf_counter() - started
    ATTEMPT_SECONDS.observe(elapsed)
    delivered = status_code is not None and 200 <= status_code < 300
    if status_code is not None:  # the answer is what counts, not a failure reading its body
        error = None if delivered else f"answered HTTP {status_code}"
    now = utcnow()
    made = delivery.attempts + 1
    status, next_at = after_attempt(made, delivered, refused, settings, now)
    ATTEMPTS.labels("retry" if status == rows.PENDING else status).inc()
    entry = {"attempt": made, "at": begun.isoformat().replace("+00:00", "Z"), "statusCode": status_code,
             "error": error, "durationMs": round(elapsed * 1000, 1)}
    if not delivered:
        log.info("webhook delivery attempt failed", delivery_id=delivery.id, webhook_id=delivery.webhook_id,
                 attempt=made, status=status, error=error)
    try:
        await ctx.store.record_webhook_attempt(rows.Attempted(
            delivery.id, delivery.lease, status, made, [*delivery.history, entry], status_code, error, next_at, now))
    except Exception as exc:  # the lease lapses and the delivery is tried again
        log.warning("webhook attempt not recorded", delivery_id=delivery.id, error=repr(exc))
        return
    if next_at is not None and (state.asleep_until is None or next_at < state.asleep_until):
        state.wake.set()  # its retry is due before the loop would look again


async def _retain(ctx: GatewayContext) -> None:
    """Finished deliveries older than the retention go, once an hour."""
    while True:
        try:
            cutoff = utcnow() - timedelta(days=ctx.settings.webhook_retention_days)
            await ctx.store.purge_webhook_deliveries(cutoff)
        except Exception as exc:
            log.warning("webhook deliveries not purged", error=repr(exc))
        await asyncio.sleep(RETENTION_INTERVAL_S)
