"""HTTP calls to a system under test, as the processor and trigger bees make them.

One call is one ``HttpRequest`` and one ``HttpResult``; a failure is a result too, never an
exception, because these bees measure load rather than carry out jobs. Every result has a
kind: None when the call succeeded (status below 400), else ``http-4xx``, ``http-5xx``,
``timeout``, ``connection`` (refused, reset, DNS, a broken response) or
``invalid-request`` (the request could not be built or sent as asked).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from pydantic import Field, ValidationInfo, field_validator
from yarl import URL

from controlplane.contract.models import Strict, utcnow
from controlplane.contract.egress import Egress
from bees.env import BeeEnv
from bees.patching import context_env

HTTP_4XX = "http-4xx"
HTTP_5XX = "http-5xx"
TIMEOUT = "timeout"
CONNECTION = "connection"
INVALID_REQUEST = "invalid-request"
ERROR_KINDS = (HTTP_4XX, HTTP_5XX, TIMEOUT, CONNECTION, INVALID_REQUEST)

METHOD_PATTERN = r"^[A-Za-z]{1,16}$"
PATH_PATTERN = r"^/"


def classify_status(status: int) -> str | None:
    """The error kind of an HTTP status; None when it counts as success."""
    if status < 400:
        return None
    return HTTP_4XX if status < 500 else HTTP_5XX


def classify_error(exc: BaseException) -> str | None:
    """The error kind of an exception raised by a call; None when it is not a call failure
    (a programming error, which should surface)."""
    if isinstance(exc, TimeoutError):  # aiohttp's own timeouts are TimeoutErrors too
        return TIMEOUT
    if isinstance(exc, (aiohttp.InvalidURL, ValueError, TypeError)):  # bad URL, header or body
        return INVALID_REQUEST
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return CONNECTION
    return None


def check_http_url(value: str) -> str:
    """Refuse anything but an absolute http(s) URL."""
    try:
        url = URL(value)
    except (ValueError, TypeError):
        raise ValueError("must be an http:// or https:// URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL")
    return value


def join_url(base: str, path: str) -> str:
    """``base`` followed by ``path``: a base with a path of its own keeps it."""
    return base.rstrip("/") + path


def url_or_sut(value: str | None, info: ValidationInfo, field_name: str) -> str | None:
    """Validate an optional address; None is only acceptable when the bee has CP_SUT_URL."""
    env = context_env(info)
    if value is not None:
        check_http_url(value)
        problem = egress_of(env).problem(value)
        if problem:
            raise ValueError(f"not allowed: {problem}")
        return value
    if env is None or not env.sut_url:
        raise ValueError(f"required: {field_name} is not set and the bee has no CP_SUT_URL to fall back on")
    return None


class HttpCallConfig(Strict):
    """What to call; shared by the processor and trigger configs."""

    method: str = Field("GET", pattern=METHOD_PATTERN)
    path: str = Field("/", pattern=PATH_PATTERN)
    body: Any = None  # sent as JSON when not None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_ms: int = Field(5000, gt=0, le=600_000)

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    path: str  # as reported in results; ``url`` ends with it
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 5.0


@dataclass(frozen=True)
class HttpResult:
    ok: bool
    status: int | None
    error_kind: str | None
    latency_ms: float
    method: str
    path: str

    @classmethod
    def failed(cls, kind: str, method: str, path: str, latency_ms: float = 0.0) -> HttpResult:
        return cls(ok=False, status=None, error_kind=kind, latency_ms=latency_ms, method=method, path=path)

    def message(self, seq: Any = None) -> dict[str, Any]:
        """The result as published on work-out; ``seq`` is the input message's, if it had one."""
        return {"seq": seq, "ok": self.ok, "status": self.status, "errorKind": self.error_kind,
                "latencyMs": self.latency_ms, "method": self.method, "path": self.path,
                "ts": utcnow().isoformat()}


async def call(session: aiohttp.ClientSession, request: HttpRequest) -> HttpResult:
    """Make one call and classify it; the body is read so the connection can be reused."""
    started = time.perf_counter()
    try:
        async with session.request(request.method, request.url, headers=request.headers,
                                   json=request.body,
                                   timeout=aiohttp.ClientTimeout(total=request.timeout_s)) as response:
            await response.read()
            status = response.status
    except Exception as exc:
        kind = classify_error(exc)
        if kind is None:
            raise
        return HttpResult.failed(kind, request.method, request.path, _ms_since(started))
    kind = classify_status(status)
    return HttpResult(ok=kind is None, status=status, error_kind=kind, latency_ms=_ms_since(started),
                      method=request.method, path=request.path)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


class RefusedDestination(OSError):
    """Every address a name resolved to is refused by the egress rules: a policy's answer,
    which a caller may tell from a network failure (and give up on rather than retry)."""


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then keeps only the addresses the egress rules allow."""

    def __init__(self, egress: Egress) -> None:
        self.egress = egress
        self._resolver = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        kept = [r for r in results if self.egress.address_problem(ipaddress.ip_address(r["host"]), port) is None]
        if not kept:
            reasons = {self.egress.address_problem(ipaddress.ip_address(r["host"]), port) for r in results}
            raise RefusedDestination(
                f"{host} resolves only to refused addresses: {'; '.join(sorted(filter(None, reasons)))}")
        return kept

    async def close(self) -> None:
        await self._resolver.close()


def guarded_connector(egress: Egress, **options: Any) -> aiohttp.TCPConnector:
    """A TCP connector whose every name resolution goes through the egress rules."""
    return aiohttp.TCPConnector(resolver=GuardedResolver(egress), **options)


def egress_of(env: BeeEnv | None) -> Egress:
    """The bee's outbound rules; validated without an environment, nothing is allowed."""
    return Egress.of(env.sut_url, env.allowed_targets) if env is not None else Egress()


def new_session(max_connections: int, egress: Egress) -> aiohttp.ClientSession:
    """A keep-alive session with at most ``max_connections`` connections, resolving names
    through the egress rules; no cookies are kept, so every call is made the same way
    however long the bee runs."""
    return aiohttp.ClientSession(connector=guarded_connector(egress, limit=max_connections),
                                 cookie_jar=aiohttp.DummyCookieJar())


async def close_later(session: aiohttp.ClientSession, delay_s: float) -> None:
    """Close a replaced session once the calls still running on it have had their timeout."""
    try:
        await asyncio.sleep(delay_s)
    finally:
        await session.close()


@dataclass
class HttpStats:
    """Counts of results, for a bee's status report."""

    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    last: HttpResult | None = None

    def add(self, result: HttpResult) -> None:
        self.requests += 1
        if result.status is not None:
            self.by_status[str(result.status)] += 1
        if result.error_kind is not None:
            self.errors[result.error_kind] += 1
        self.last = result

    def report(self) -> dict[str, Any]:
        return {"requests": self.requests, "byStatus": dict(self.by_status), "errors": dict(self.errors)}
