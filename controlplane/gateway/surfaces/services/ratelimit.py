"""Rate limits of the services surface: each caller (a configured API key, else its address)
may make so many requests per window (``CP_RATE_LIMIT``); every answer says the limit, what is
left and when the window resets (``X-RateLimit-*``), and a caller past the limit gets a 429.

Counting is the ``limits`` library's, in this process's memory by default, so the hot path
never leaves the process; or in a Redis that several gateways share (``CP_RATE_LIMIT_STORAGE``),
so that a limit holds across them. A counter is one atomic increment with an expiry on every
request: Redis does it in memory, where the SQL store would put a durable write on each
request's path. A storage that fails lets requests through (fail open): a rate limit protects
the surface, it must not take it down.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

from aiohttp import web
from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.storage import storage_from_string
from prometheus_client import Counter

from controlplane.config import Settings
from controlplane.logs import get_logger

log = get_logger("gateway.ratelimit")

NAMESPACE = "services"
# A key's digest, not the key, names its counter (in memory, in Redis, in logs): 128 bits keep
# keys apart, and a digest read out of Redis gives no key back.
KEY_DIGEST_HEX = 32
_DIGEST_DOMAIN = b"controlplane rate limit\0"
# A Redis that answers no faster than this is down for this request; after a failure, requests
# pass unchecked this long before it is asked again: an outage delays one request in each such
# period, not every request.
STORAGE_TIMEOUT_S = 0.5
STORAGE_RETRY_S = 2.0
# The table of known resets is swept of past windows once it has doubled since the last sweep.
RESETS_PRUNE_MIN = 1024

FAILED_OPEN = Counter("cp_rate_limit_failed_open_total",
                      "Requests to the services surface let through unchecked: the rate-limit storage failed")


@dataclass(frozen=True)
class Quota:
    """One request counted against its caller's limit."""

    allowed: bool
    limit: int
    remaining: int
    reset: int  # UTC epoch seconds at which the window resets
    retry_after: int  # seconds; meaningful when not allowed
    window: str  # "hour", "minute"...: for the 429 message

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset)}


def key_digest(token: str) -> str:
    """What names a key's counter: a truncated SHA-256 of the key, never the key itself."""
    return hashlib.sha256(_DIGEST_DOMAIN + token.encode()).hexdigest()[:KEY_DIGEST_HEX]


def bearer(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or ""."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def client_address(remote: str | None, forwarded_for: str | None = None) -> str:
    """The caller's address: the last one of ``X-Forwarded-For`` when given (the one the proxy
    in front added; those before it are the caller's to write), else the peer's."""
    if forwarded_for:
        found = _address(forwarded_for.rsplit(",", 1)[-1].strip())
        if found is not None:
            return found
    return _address(remote or "") or "unknown"


@lru_cache(maxsize=4096)  # callers come back: parsing an address costs more than the rest of a hit
def _address(text: str) -> str | None:
    """An address written one way: IPv4 as it is (also when mapped into IPv6), IPv6 by its /64,
    the block one host is usually given; None when ``text`` is not an address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address), 64), strict=False))
    return str(address)


class KnownKeys:
    """The configured API keys, each with its digest. Only a configured key has a counter of
    its own: a caller that sent anything else is counted by address, so guessing keys (each
    guess a new token) or inventing tokens does not escape the limit."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple((key.encode(), key_digest(key)) for key in keys)

    def digest_of(self, token: str) -> str | None:
        given, found = token.encode(), None
        for key, digest in self._keys:  # every key compared, in constant time, as the auth check does
            if hmac.compare_digest(given, key):
                found = digest
        return found


def caller(headers: Mapping[str, str], remote: str | None, keys: KnownKeys, trust_forwarded: bool) -> str:
    """Whom a request is counted against: ``key-<digest>`` or ``addr-<address>``."""
    token = bearer(headers.get("Authorization", ""))
    digest = keys.digest_of(token) if token else None
    if digest is not None:
        return f"key-{digest}"
    return "addr-" + client_address(remote, headers.get("X-Forwarded-For") if trust_forwarded else None)


def window_name(item: RateLimitItem) -> str:
    name = item.GRANULARITY.name
    return name if item.multiples == 1 else f"{item.multiples} {name}s"


def storage_options(url: str) -> dict[str, float]:
    """The client's timeouts, for the storages that talk to a server (Redis)."""
    scheme = urlparse(url).scheme
    return {"connect_timeout": STORAGE_TIMEOUT_S, "stream_timeout": STORAGE_TIMEOUT_S} if "redis" in scheme else {}


class RateLimits:
    """One fixed window counter per caller, in a ``limits`` storage: the increment the library's
    ``FixedWindowRateLimiter`` makes, its result kept as the count.

    Why a fixed window: its reset is exact, the instant the count starts again from zero, which
    is what ``X-RateLimit-Reset`` promises; and a caller's window starts at its first request,
    so resets are spread over time rather than all at the top of the hour. The sliding window
    counter and the moving window smooth the edge between windows (a caller may spend its limit
    at the end of one window and again at the start of the next), but their reset is only an
    estimate of when one more request fits. Why not the strategy's own ``hit`` and
    ``get_window_stats``: the first keeps only whether the increment passed, the second reads
    the count and the expiry again, three calls where one does: the increment gives the count,
    and the reset is known from when this gateway saw the window start (count 1), so only a
    window another gateway started costs one more read, once.
    """

    def __init__(self, item: RateLimitItem, storage: Storage, keys: KnownKeys, trust_forwarded: bool = False) -> None:
        self.item, self.storage, self.keys, self.trust_forwarded = item, storage, keys, trust_forwarded
        self.period_s = item.get_expiry()
        self.window = window_name(item)
        self._resets: dict[str, float] = {}  # counter key -> when its window resets, once known here
        self._prune_at = RESETS_PRUNE_MIN
        self._retry_at = 0.0  # while the storage is failing: when to ask it again
        self._failing = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        url = settings.rate_limit_storage.get_secret_value()  # validated and made async by Settings
        storage = storage_from_string(url, wrap_exceptions=True, **storage_options(url))
        assert isinstance(storage, Storage)
        keys = KnownKeys(k.get_secret_value() for k in (settings.api_key, settings.read_api_key) if k is not None)
        return cls(parse(settings.rate_limit), storage, keys, settings.rate_limit_trust_forwarded)

    async def hit(self, request: web.Request) -> Quota:
        """Count ``request`` against its caller's limit: one call to the storage, as a rule."""
        now = time.time()
        key = self.item.key_for(NAMESPACE, caller(request.headers, request.remote, self.keys, self.trust_forwarded))
        if self._failing and now < self._retry_at:
            return self._unchecked(key, now)
        try:
            count, reset = await self._count(key, now)
        except Exception as exc:  # whatever the storage's client raises: the request goes on
            self._fail(exc, now)
            return self._unchecked(key, now)
        if self._failing:
            self._failing = False
            log.warning("rate-limit storage answers again; limits apply again")
        limit = self.item.amount
        if count <= limit:
            return Quota(True, limit, limit - count, math.ceil(reset), 0, self.window)
        return Quota(False, limit, 0, math.ceil(reset), max(1, math.ceil(reset - now)), self.window)

    async def _count(self, key: str, now: float) -> tuple[int, float]:
        """The caller's count with this request, and when its window resets."""
        count = await self.storage.incr(key, self.period_s)
        known = self._resets.get(key, 0.0)
        if count == 1 or known <= now:
            if count == 1:
                known = now + self.period_s
            else:  # a window another gateway started, or one this gateway forgot
                known = await self.storage.get_expiry(key)
                if known - time.time() < 1:
                    # No expiry: the process that counted the first request died before setting
                    # it, and the counter would never reset. Start its window again.
                    await self.storage.clear(key)
                    count, known = await self.storage.incr(key, self.period_s), now + self.period_s
            self._remember(key, known, now)
        return count, known

    def _remember(self, key: str, reset: float, now: float) -> None:
        """Keep a window's reset; the windows past are dropped whenever the table has doubled."""
        self._resets[key] = reset
        if len(self._resets) >= self._prune_at:
            self._resets = {k: r for k, r in self._resets.items() if r > now}
            self._prune_at = max(RESETS_PRUNE_MIN, 2 * len(self._resets))

    def _fail(self, exc: Exception, now: float) -> None:
        if not self._failing:
            log.warning("rate-limit storage failed; requests pass unchecked until it answers",
                        error=f"{type(exc).__name__}: {exc}", retry_s=STORAGE_RETRY_S)
        self._failing, self._retry_at = True, now + STORAGE_RETRY_S

    def _unchecked(self, key: str, now: float) -> Quota:
        """Let the request through: what is left is unknown, so the whole limit is shown."""
        FAILED_OPEN.inc()
        known = self._resets.get(key, 0.0)
        reset = known if known > now else now + self.period_s
        return Quota(True, self.item.amount, self.item.amount, math.ceil(reset), 0, self.window)

    async def close(self) -> None:
        """The library's storages have no close of their own: a Redis storage's connections are
        dropped here, and the memory storage's expiry task cancelled."""
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)  # coredis' client
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()
        timer = getattr(self.storage, "timer", None)
        if timer is not None:
            timer.cancel()
