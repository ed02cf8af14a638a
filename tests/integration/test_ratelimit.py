"""Rate limits of the services surface on a real gateway (real RabbitMQ; Redis for the shared
counter): the headers on every answer of the surface, a 429 past the limit, a counter per
caller, nothing counted outside the surface, one counter shared by two gateways through Redis,
and requests let through when the counter's storage is down.

Limits are "5/hour": a caller's window starts at its first request and lasts an hour, so no
window ends during a test, however slow the machine.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import pytest
from limits import parse
from limits.aio.storage import RedisStorage

from controlplane.config import Settings
from controlplane.gateway.surfaces.services.ratelimit import NAMESPACE, key_digest
from tests.conftest import Stack, running_stack

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("CP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LIMIT = 5
HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


@asynccontextmanager
async def gateway(settings_factory: Callable[..., Settings], **overrides: Any) -> AsyncIterator[Stack]:
    """A gateway without a host controller: the services surface answers from its memory."""
    settings = settings_factory(rate_limit=f"{LIMIT}/hour", **overrides)
    async with running_stack(settings, None, with_host=False) as stack:  # type: ignore[arg-type]  # no engine needed
        yield stack


@asynccontextmanager
async def redis() -> AsyncIterator[coredis.Redis[str]]:
    """A client of the test Redis; unreachable is a failure, not a skip."""
    client: coredis.Redis[str] = coredis.Redis.from_url(REDIS_URL, decode_responses=True, connect_timeout=5,
                                                        stream_timeout=5)
    try:
        await client.ping()
    except (coredis.exceptions.RedisError, OSError) as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc!r}); run scripts/ensure-redis.sh or point "
                    "CP_TEST_REDIS_URL at a server", pytrace=False)
    try:
        yield client
    finally:
        client.connection_pool.disconnect()


async def call(stack: Stack, path: str, key: str | None = None, method: str = "GET") -> tuple[int, Any, Mapping[str, str]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with stack.client.request(method, path, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


def quota(headers: Mapping[str, str]) -> tuple[int, int, int]:
    """(limit, remaining, reset) of an answer, each header present and an integer."""
    limit, remaining, reset = (int(headers[name]) for name in HEADERS)
    return limit, remaining, reset


def new_api_key() -> str:
    return f"key-{uuid.uuid4().hex}"


async def test_every_answer_carries_the_headers_and_each_caller_counts_apart(
        settings_factory: Callable[..., Settings]) -> None:
    admin, reader = new_api_key(), new_api_key()
    started = time.time()
    async with gateway(settings_factory, api_key=admin, read_api_key=reader, protect_reads=True) as gw:
        # A key's answers, whatever their status, each count one: 200, 404, 400.
        seen = [await call(gw, "/api/system/stats", admin), await call(gw, "/api/services/no-such-service", admin),
                await call(gw, "/api/services?filter=bogus", admin)]
        assert [status for status, _, _ in seen] == [200, 404, 400]
        assert seen[0][1]["success"] is True and all(body["success"] is False for _, body, _ in seen[1:])
        assert [quota(h)[:2] for _, _, h in seen] == [(LIMIT, 4), (LIMIT, 3), (LIMIT, 2)]
        admin_reset = quota(seen[0][2])[2]
        assert {quota(h)[2] for _, _, h in seen} == {admin_reset}
        assert started + 3600 <= admin_reset <= time.time() + 3601  # UTC epoch seconds, an hour after the first

        # Without a key (401 in the envelope, read or write), or with a key that is not one: the
        # address's counter, apart from the key's. An invented token gets no counter of its own.
        status, body, headers = await call(gw, "/api/system/stats")
        assert status == 401 and body["success"] is False and quota(headers)[:2] == (LIMIT, 4)
        status, body, headers = await call(gw, "/api/services/some-service/start", method="POST")
        assert status == 401 and body["success"] is False and quota(headers)[:2] == (LIMIT, 3)
        status, body, headers = await call(gw, "/api/system/stats", "invented-token-1")
        assert status == 403 and body["success"] is False and quota(headers)[:2] == (LIMIT, 2)
        status, _, headers = await call(gw, "/api/system/stats", "invented-token-2")
        assert status == 403 and quota(headers)[:2] == (LIMIT, 1)

        # The read key: a counter of its own.
        status, _, headers = await call(gw, "/api/services", reader)
        assert status == 200 and quota(headers)[:2] == (LIMIT, 4)

        # Outside the surface: no headers, and nothing counted.
        for path in ("/healthz", "/api/swarms", "/openapi.json", "/metrics"):
            async with gw.client.get(path, headers={"Authorization": f"Bearer {admin}"}) as resp:
                assert resp.status == 200, path
                assert not any(name in resp.headers for name in HEADERS), path

        # The key's last two, then 429 in the envelope, with a Retry-After that agrees with the reset.
        remaining = [quota((await call(gw, "/api/services", admin))[2])[1] for _ in range(2)]
        assert remaining == [1, 0]
        for _ in range(2):
            asked = time.time()
            status, body, headers = await call(gw, "/api/system/stats", admin)
            assert status == 429 and body["success"] is False and body["code"] == "rate-limited"
            assert f"{LIMIT} requests per hour" in body["error"]
            assert quota(headers) == (LIMIT, 0, admin_reset)
            retry_after = int(headers["Retry-After"])
            assert retry_after > 0 and body["retryAfterS"] == retry_after
            # Counted from the moment the gateway answered, which lies between these two.
            assert asked - 1 <= admin_reset - retry_after <= time.time() + 1

        # The address's last one, then 429 before the auth check says 401; the read key goes on.
        status, _, headers = await call(gw, "/api/system/stats")
        assert status == 401 and quota(headers)[1] == 0
        status, body, headers = await call(gw, "/api/system/stats")
        assert status == 429 and body["success"] is False and int(headers["Retry-After"]) > 0
        status, _, headers = await call(gw, "/api/system/stats", reader)
        assert status == 200 and quota(headers)[:2] == (LIMIT, 3)


async def test_two_gateways_sharing_redis_share_one_counter_that_names_no_key(
        settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    key = new_api_key()
    digest = key_digest(key)
    shared = dict(api_key=key, rate_limit_storage=f"async+{REDIS_URL}")
    async with redis() as client:
        try:
            async with gateway(settings_factory, gateway_id="gw-a", database_url=f"sqlite:///{tmp_path / 'a.db'}",
                               **shared) as a, \
                    gateway(settings_factory, gateway_id="gw-b", database_url=f"sqlite:///{tmp_path / 'b.db'}",
                            **shared) as b:
                answers = [await call(gw, "/api/system/stats", key) for gw in (a, b, a, b, a)]
                assert [status for status, _, _ in answers] == [200] * 5
                assert [quota(h)[1] for _, _, h in answers] == [4, 3, 2, 1, 0]
                refused = [await call(gw, "/api/system/stats", key) for gw in (b, a)]
                assert [status for status, _, _ in refused] == [429, 429]
                resets = {quota(h)[2] for _, _, h in answers + refused}
                assert max(resets) - min(resets) <= 1  # Redis gives the other gateway whole seconds

                # Redis holds the digest, never the key.
                names = [name async for name in client.scan_iter(match=f"*{digest}*")]
                assert len(names) == 1 and int(await client.get(names[0]) or 0) == LIMIT + 2
                assert 3500 < await client.ttl(names[0]) <= 3600
                assert [name async for name in client.scan_iter(match=f"*{key}*")] == []
                assert [name async for name in client.scan_iter(match=f"*{key[4:]}*")] == []
        finally:
            found = [name async for name in client.scan_iter(match=f"*{digest}*")]
            if found:
                await client.delete(found)


async def test_a_shared_counter_left_without_expiry_starts_its_window_again(
        settings_factory: Callable[..., Settings]) -> None:
    """The storage's first increment and its expiry are two calls: a gateway that died between
    them would leave a counter that never resets. The next request starts it again."""
    key = new_api_key()
    name = f"{RedisStorage.PREFIX}:{parse(f'{LIMIT}/hour').key_for(NAMESPACE, f'key-{key_digest(key)}')}"
    async with redis() as client:
        try:
            await client.set(name, str(LIMIT + 10))
            assert await client.ttl(name) == -1
            async with gateway(settings_factory, api_key=key, rate_limit_storage=f"async+{REDIS_URL}") as gw:
                status, _, headers = await call(gw, "/api/system/stats", key)
                assert status == 200 and quota(headers)[:2] == (LIMIT, 4)
                assert 3500 < await client.ttl(name) <= 3600
        finally:
            await client.delete([name])


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def failed_open(stack: Stack) -> float:
    async with stack.client.get("/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^cp_rate_limit_failed_open_total (\S+)$", text, re.MULTILINE)
    assert found, "the metric is missing from /metrics"
    return float(found.group(1))


async def test_requests_pass_with_the_headers_when_the_storage_is_down(settings_factory: Callable[..., Settings]) -> None:
    key = new_api_key()
    async with gateway(settings_factory, api_key=key,
                       rate_limit_storage=f"async+redis://127.0.0.1:{closed_port()}/0") as gw:
        before = await failed_open(gw)
        for _ in range(LIMIT + 2):
            status, body, headers = await call(gw, "/api/system/stats", key)
            assert status == 200 and body["success"] is True
            limit, remaining, reset = quota(headers)
            assert (limit, remaining) == (LIMIT, LIMIT) and reset > time.time()
        assert await failed_open(gw) - before == LIMIT + 2
