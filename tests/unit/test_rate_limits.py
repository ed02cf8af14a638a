"""Rate limits of the services surface, without a gateway: whom a request is counted against,
a limiter in memory, one whose storage fails, and the settings refused at start-up."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp.test_utils import make_mocked_request
from limits import parse
from limits.storage import storage_from_string
from structlog.testing import capture_logs

from controlplane.config import Settings, settings_or_exit
from controlplane.gateway.surfaces.services import ratelimit
from controlplane.gateway.surfaces.services.ratelimit import (KEY_DIGEST_HEX, KnownKeys, RateLimits, caller,
                                                               client_address, key_digest)

ADMIN, READER = "admin-key-0123456789", "read-key-0123456789"


def test_a_key_is_named_by_a_truncated_digest_that_does_not_contain_it() -> None:
    digest = key_digest(ADMIN)
    assert digest == key_digest(ADMIN) and len(digest) == KEY_DIGEST_HEX
    assert int(digest, 16) >= 0 and ADMIN not in digest and "admin" not in digest
    assert key_digest(READER) != digest and key_digest(ADMIN + " ") != digest


def test_a_configured_key_is_counted_by_its_digest() -> None:
    keys = KnownKeys([ADMIN, READER])
    assert caller({"Authorization": f"Bearer {ADMIN}"}, "10.0.0.1", keys, False) == f"key-{key_digest(ADMIN)}"
    assert caller({"Authorization": f"bearer  {READER} "}, "10.0.0.1", keys, False) == f"key-{key_digest(READER)}"


def test_without_a_configured_key_the_address_counts() -> None:
    """An invented or guessed token is counted by the caller's address: a new token per request
    must not mean a new counter per request."""
    keys = KnownKeys([ADMIN])
    for headers in ({}, {"Authorization": "Bearer not-a-key-at-all"}, {"Authorization": f"Basic {ADMIN}"},
                    {"Authorization": "Bearer "}, {"Authorization": ADMIN}):
        assert caller(headers, "10.0.0.1", keys, False) == "addr-10.0.0.1", headers
    assert caller({"Authorization": f"Bearer {ADMIN}"}, "10.0.0.1", KnownKeys([]), False) == "addr-10.0.0.1"


def test_forwarded_for_is_read_only_when_trusted_and_then_its_last_address() -> None:
    keys = KnownKeys([])
    headers = {"X-Forwarded-For": "1.1.1.1, 203.0.113.7"}
    assert caller(headers, "10.0.0.1", keys, False) == "addr-10.0.0.1"
    assert caller(headers, "10.0.0.1", keys, True) == "addr-203.0.113.7"
    assert caller({"X-Forwarded-For": "1.1.1.1, not-an-address"}, "10.0.0.1", keys, True) == "addr-10.0.0.1"
    assert caller({}, "10.0.0.1", keys, True) == "addr-10.0.0.1"


def test_addresses_are_normalised() -> None:
    assert client_address("2001:db8:1:2:3:4:5:6") == client_address("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert client_address("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_address(None) == "unknown" and client_address("") == "unknown"


def _request(remote: str, key: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return make_mocked_request("GET", "/api/system/stats", headers=headers).clone(remote=remote)


async def test_a_limiter_in_memory_counts_each_caller_apart() -> None:
    limits = RateLimits(parse("3/hour"), storage_from_string("async+memory://"), KnownKeys([ADMIN]))
    try:
        started = time.time()
        seen = [await limits.hit(_request("10.0.0.1")) for _ in range(4)]
        ended = time.time()
        assert [q.remaining for q in seen] == [2, 1, 0, 0] and [q.allowed for q in seen] == [True, True, True, False]
        assert {q.limit for q in seen} == {3} and {q.window for q in seen} == {"hour"}
        # The window started with the first request and lasts the period; every answer agrees.
        refused = seen[-1]
        assert {q.reset for q in seen} == {refused.reset} and started + 3600 <= refused.reset <= ended + 3601
        assert started - 1 <= refused.reset - refused.retry_after <= ended + 1
        assert refused.headers() == {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0",
                                     "X-RateLimit-Reset": str(refused.reset)}
        # Another address, and the key from the exhausted address: counters of their own.
        assert (await limits.hit(_request("10.0.0.2"))).remaining == 2
        assert (await limits.hit(_request("10.0.0.1", ADMIN))).remaining == 2
    finally:
        await limits.close()


def _refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as refused:
        settings_or_exit(Settings)
    return str(refused.value)


@pytest.mark.parametrize("value", ["1000", "1000/fortnight", "lots/hour", "10/minute;1000/hour", "0/hour", ""])
def test_a_bad_rate_limit_stops_start_up_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    message = _refusal(monkeypatch, CP_RATE_LIMIT=value)
    assert "CP_RATE_LIMIT:" in message and ("1000/hour" in message or "at least 1" in message)


def test_a_bad_storage_stops_start_up_without_showing_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refusal(monkeypatch, CP_RATE_LIMIT_STORAGE="postgres://user:s3cret-pw@db/x")
    assert "CP_RATE_LIMIT_STORAGE:" in message and "unknown rate-limit storage postgres://" in message
    message = _refusal(monkeypatch, CP_RATE_LIMIT_STORAGE="async+redis://:s3cret-pw@127.0.0.1:port/0")
    assert "CP_RATE_LIMIT_STORAGE:" in message and "s3cret-pw" not in message
    message = _refusal(monkeypatch, CP_RATE_LIMIT_STORAGE="memcached://127.0.0.1:11211")
    assert "CP_RATE_LIMIT_STORAGE:" in message and "prerequisite" in message  # no async memcached client here
    assert "CP_RATE_LIMIT_STORAGE:" in _refusal(monkeypatch, CP_RATE_LIMIT_STORAGE="127.0.0.1:6379")


def test_good_settings_and_their_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.rate_limit == "1000/hour" and defaults.rate_limit_trust_forwarded is False
    assert defaults.rate_limit_storage.get_secret_value() == "async+memory://"
    monkeypatch.setenv("CP_RATE_LIMIT", "100 per 2 minutes")
    monkeypatch.setenv("CP_RATE_LIMIT_STORAGE", "redis://:pw@127.0.0.1:6379/3")
    monkeypatch.setenv("CP_RATE_LIMIT_TRUST_FORWARDED", "true")
    settings = Settings()
    assert settings.rate_limit_storage.get_secret_value() == "async+redis://:pw@127.0.0.1:6379/3"
    assert "pw" not in repr(settings.rate_limit_storage) and settings.rate_limit_trust_forwarded
    limits = RateLimits.from_settings(settings)
    assert (limits.item.amount, limits.period_s, limits.window) == (100, 120, "2 minutes")


async def test_a_failing_storage_lets_requests_through_and_is_asked_again_only_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that hangs up on every connection: the first request finds it failing, the next
    ones pass without asking it until the retry time (an hour here, so no clock can reach it)."""
    connections = 0

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    monkeypatch.setattr(ratelimit, "STORAGE_RETRY_S", 3600.0)
    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    storage = storage_from_string(f"async+redis://127.0.0.1:{port}/0", wrap_exceptions=True,
                                  **ratelimit.storage_options("async+redis://"))
    limits = RateLimits(parse("3/hour"), storage, KnownKeys([]))
    before = ratelimit.FAILED_OPEN._value.get()
    try:
        with capture_logs() as logged:
            quotas = [await limits.hit(_request("10.0.0.1"))]
            tried = connections
            quotas += [await limits.hit(_request("10.0.0.1")) for _ in range(4)]
    finally:
        await limits.close()
        server.close()
        await server.wait_closed()
    assert all(q.allowed and q.remaining == q.limit == 3 and q.reset > time.time() for q in quotas)
    assert tried >= 1 and connections == tried  # the first hit asked; the next four did not
    assert ratelimit.FAILED_OPEN._value.get() - before == 5
    assert [e["event"] for e in logged if e["log_level"] == "warning"] == [
        "rate-limit storage failed; requests pass unchecked until it answers"]
