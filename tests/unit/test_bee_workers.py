"""Pure logic of the bees: configs, pacing gate, request building, result classification, stats."""

from __future__ import annotations

import ipaddress

import asyncio
import math
from typing import Any

import aiohttp
import pytest

from bees.env import BeeEnv
from bees.generator import Generator, GeneratorConfig
from bees.http import (CONNECTION, HTTP_4XX, HTTP_5XX, INVALID_REQUEST, TIMEOUT, GuardedResolver, HttpResult,
                       HttpStats, classify_error, classify_status, join_url)
from bees.moderator import (FIXED_RATE_MIN_PREFETCH, PASS_THROUGH_PREFETCH, Moderator, ModeratorConfig,
                            prefetch_for)
from bees.pacing import Gate, Pacer
from bees.patching import ConfigRejected, apply_patch, config_context, parse_config
from bees.postprocessor import (INVALID_RESULT, Postprocessor, PostprocessorConfig, latency_summary, nearest_rank,
                                result_latency)
from bees.processor import InvalidRequest, ProcessorConfig, request_for
from bees.sdk import BeeContext
from bees.sut import MAX_PATHS, OTHER_PATHS, Counts, SutEnv
from bees.trigger import TriggerConfig
from controlplane.config import settings_or_exit
from controlplane.contract.egress import Egress

SUT = "http://sut.test:8080"


def _env(sut_url: str | None = None, **fields: Any) -> BeeEnv:
    return BeeEnv(swarm_id="s1", role="test", instance="s1-test", sut_url=sut_url, **fields)


# Hosts these tests call besides the SUT, as an operator would allow them.
ALLOWED = ["other:9", "elsewhere:81", "sut.test"]


def _parse(model: type[Any], data: dict[str, Any], sut_url: str | None = None) -> Any:
    return parse_config(model, data, config_context(_env(sut_url, allowed_targets=ALLOWED)))


def _refused(model: type[Any], data: dict[str, Any], sut_url: str | None = None) -> ConfigRejected:
    with pytest.raises(ConfigRejected) as caught:
        _parse(model, data, sut_url)
    return caught.value


class Published:
    """A stand-in for ``BeeContext.publish`` that keeps what would have been sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, body: dict[str, Any]) -> None:
        self.bodies.append(body)


def _ctx(config: Any, env: BeeEnv | None = None) -> tuple[BeeContext[Any], Published]:
    ctx: BeeContext[Any] = BeeContext(env or _env(), config)
    published = Published()
    ctx.publish = published  # type: ignore[method-assign]
    return ctx, published


# --- environment ---------------------------------------------------------------------


def test_env_reads_the_sut_address_and_treats_blank_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"CP_SWARM_ID": "s1", "CP_ROLE": "processor", "CP_INSTANCE": "s1-proc"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CP_SUT_URL", SUT)
    assert BeeEnv().sut_url == SUT
    monkeypatch.setenv("CP_SUT_URL", "")
    assert BeeEnv().sut_url is None


# --- percentiles -----------------------------------------------------------------------


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [nearest_rank(values, p) for p in (0, 1, 50, 95, 99, 100)] == [1, 1, 50, 95, 99, 100]
    assert nearest_rank([7.0], 99) == 7.0
    assert nearest_rank([float(v) for v in range(1, 1001)], 99) == 990.0
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # rank ceil(0.5 * 4) = 2
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    assert nearest_rank([], 50) is None
    with pytest.raises(ValueError):
        nearest_rank(values, 101)


def test_latency_summary_sorts_and_reports_the_count_it_is_given() -> None:
    summary = latency_summary([30.0, 10.0, 20.0, 40.0], count=9)
    assert summary == {"count": 9, "p50": 20.0, "p95": 40.0, "p99": 40.0, "max": 40.0}
    assert latency_summary([], 0) == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}


@pytest.mark.parametrize("value", [None, "12", True, -1, math.nan, math.inf, [1]])
def test_a_message_without_a_usable_latency_is_not_a_result(value: object) -> None:
    assert result_latency({"latencyMs": value}) is None


async def test_postprocessor_counts_results_and_keeps_a_bounded_window() -> None:
    worker = Postprocessor()
    ctx, _ = _ctx(PostprocessorConfig(window=3))
    await worker.setup(ctx)
    for latency in (100.0, 1.0, 2.0, 3.0):
        await worker.handle(ctx, {"ok": True, "latencyMs": latency, "status": 200})
    await worker.handle(ctx, {"ok": False, "latencyMs": 4.0, "status": None, "errorKind": "timeout"})
    await worker.handle(ctx, {"seq": 3})
    report = worker.report(ctx)
    assert report["latency"] == {"count": 5, "p50": 3.0, "p95": 4.0, "p99": 4.0, "max": 4.0}  # 100 left the window
    assert report["ok"] == 4 and report["failed"] == 1
    assert report["errors"] == {"timeout": 1, INVALID_RESULT: 1}
    assert ctx.totals.errors == 1  # only the message that was not a result

    previous, ctx.config = ctx.config, PostprocessorConfig(window=2)
    await worker.on_config(ctx, previous)
    assert list(worker.samples) == [3.0, 4.0]


# --- result classification ---------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [(200, None), (204, None), (302, None), (399, None), (400, HTTP_4XX),
                                              (404, HTTP_4XX), (499, HTTP_4XX), (500, HTTP_5XX), (503, HTTP_5XX)])
def test_status_classification(status: int, kind: str | None) -> None:
    assert classify_status(status) == kind


@pytest.mark.parametrize(("exc", "kind"), [
    (TimeoutError(), TIMEOUT),
    (asyncio.TimeoutError(), TIMEOUT),
    (aiohttp.ServerTimeoutError("read"), TIMEOUT),
    (aiohttp.ConnectionTimeoutError("connect"), TIMEOUT),
    (ConnectionRefusedError(111, "refused"), CONNECTION),
    (ConnectionResetError(104, "reset"), CONNECTION),
    (aiohttp.ServerDisconnectedError(), CONNECTION),
    (aiohttp.ClientOSError(104, "reset"), CONNECTION),
    (aiohttp.ClientPayloadError("truncated"), CONNECTION),
    (aiohttp.InvalidURL("http://"), INVALID_REQUEST),
    (TypeError("Object of type set is not JSON serializable"), INVALID_REQUEST),
    (ValueError("newline in header"), INVALID_REQUEST),
    (RuntimeError("a bug"), None),
    (KeyError("a bug"), None),
])
def test_error_classification(exc: BaseException, kind: str | None) -> None:
    assert classify_error(exc) == kind


def test_result_message_format() -> None:
    message = HttpResult(ok=False, status=503, error_kind=HTTP_5XX, latency_ms=12.5, method="GET",
                         path="/x").message(seq=7)
    assert set(message) == {"seq", "ok", "status", "errorKind", "latencyMs", "method", "path", "ts"}
    assert message["seq"] == 7 and message["status"] == 503 and message["errorKind"] == HTTP_5XX
    assert HttpResult.failed(CONNECTION, "POST", "/y").message()["status"] is None


def test_http_stats_count_statuses_and_error_kinds() -> None:
    stats = HttpStats()
    for result in (HttpResult(True, 200, None, 1.0, "GET", "/"), HttpResult(True, 200, None, 1.0, "GET", "/"),
                   HttpResult(False, 404, HTTP_4XX, 1.0, "GET", "/"), HttpResult.failed(TIMEOUT, "GET", "/", 5.0)):
        stats.add(result)
    assert stats.report() == {"requests": 4, "byStatus": {"200": 2, "404": 1},
                              "errors": {HTTP_4XX: 1, TIMEOUT: 1}}
    assert stats.last is not None and stats.last.error_kind == TIMEOUT


# --- processor requests --------------------------------------------------------------------


def _processor_config(**fields: Any) -> ProcessorConfig:
    return _parse(ProcessorConfig, fields, SUT)


def test_request_comes_from_the_config_when_the_message_says_nothing() -> None:
    config = _processor_config(method="post", path="/orders", body={"a": 1}, headers={"X-A": "1"}, timeoutMs=250)
    request = request_for(config, SUT, {"seq": 1})
    assert (request.method, request.url, request.path) == ("POST", SUT + "/orders", "/orders")
    assert request.body == {"a": 1} and request.headers == {"X-A": "1"} and request.timeout_s == 0.25


def test_message_overrides_replace_fields_and_add_headers() -> None:
    config = _processor_config(path="/orders", body={"a": 1}, headers={"X-A": "1", "X-B": "1"})
    request = request_for(config, SUT + "/api/", {"request": {"method": "put", "path": "/items/3?x=1",
                                                              "body": [1, 2], "headers": {"X-B": "2"}}})
    assert request.method == "PUT" and request.url == SUT + "/api/items/3?x=1" and request.path == "/items/3?x=1"
    assert request.body == [1, 2] and request.headers == {"X-A": "1", "X-B": "2"}
    # A message may also clear the body; leaving it out keeps the config's.
    assert request_for(config, SUT, {"request": {"body": None}}).body is None
    assert request_for(config, SUT, {"request": {"method": "GET"}}).body == {"a": 1}


@pytest.mark.parametrize(("request_", "field"), [
    ("GET /", "request"),
    ({"path": "no-slash"}, "path"),
    ({"method": "GET /"}, "method"),
    ({"headers": {"X-A": 1}}, "headers.X-A"),
    ({"verb": "GET"}, "verb"),
])
def test_unusable_request_overrides_are_invalid_requests(request_: object, field: str) -> None:
    with pytest.raises(InvalidRequest, match=field.replace(".", r"\.")):
        request_for(_processor_config(), SUT, {"request": request_})


def test_join_url_keeps_the_base_path() -> None:
    assert join_url("http://h:1", "/a") == "http://h:1/a"
    assert join_url("http://h:1/api/", "/a?b=1") == "http://h:1/api/a?b=1"


# --- configs ---------------------------------------------------------------------------------


def test_processor_falls_back_on_the_sut_address() -> None:
    config = _parse(ProcessorConfig, {}, SUT)
    assert config.base_url is None and config.target(_env(SUT)) == SUT
    assert config.max_connections == 50 and config.timeout_ms == 5000 and config.method == "GET"
    explicit = _parse(ProcessorConfig, {"baseUrl": "https://other:9/"}, SUT)
    assert explicit.target(_env(SUT)) == "https://other:9/"


def test_processor_without_any_address_is_refused_naming_base_url() -> None:
    refused = _refused(ProcessorConfig, {})
    assert refused.fields == ["baseUrl"] and "CP_SUT_URL" in refused.message
    assert _parse(ProcessorConfig, {"baseUrl": SUT}).base_url == SUT
    # Without a context nothing is known about the environment: an address is required.
    with pytest.raises(ConfigRejected, match="baseUrl"):
        parse_config(ProcessorConfig, {})


def test_patch_that_removes_the_only_address_is_refused() -> None:
    context = config_context(_env(allowed_targets=ALLOWED))
    current = parse_config(ProcessorConfig, {"baseUrl": SUT}, context)
    with pytest.raises(ConfigRejected) as caught:
        apply_patch(ProcessorConfig, current, {"baseUrl": None}, context)
    assert caught.value.fields == ["baseUrl"]
    with_sut = config_context(_env(SUT))
    config, _ = apply_patch(ProcessorConfig, current, {"baseUrl": None}, with_sut)
    assert config.base_url is None


@pytest.mark.parametrize(("model", "data", "field"), [
    (ProcessorConfig, {"baseUrl": "ftp://sut"}, "baseUrl"),
    (ProcessorConfig, {"baseUrl": "not a url"}, "baseUrl"),
    (ProcessorConfig, {"timeoutMs": 0}, "timeoutMs"),
    (ProcessorConfig, {"maxConnections": 0}, "maxConnections"),
    (ProcessorConfig, {"method": "GET /"}, "method"),
    (ProcessorConfig, {"path": "orders"}, "path"),
    (ProcessorConfig, {"headers": {"X-A": 1}}, "headers.X-A"),
    (ProcessorConfig, {"maxConnection": 5}, "maxConnection"),
    (TriggerConfig, {"intervalS": 0}, "intervalS"),
    (TriggerConfig, {"url": "sut:8080"}, "url"),
    (TriggerConfig, {"timeoutMs": -1}, "timeoutMs"),
    (ModeratorConfig, {"mode": "fixed-rate"}, "ratePerSec"),
    (ModeratorConfig, {"mode": "fixed-rate", "ratePerSec": 0}, "ratePerSec"),
    (ModeratorConfig, {"mode": "fixed-rate", "ratePerSec": 10001}, "ratePerSec"),
    (ModeratorConfig, {"mode": "burst"}, "mode"),
    (PostprocessorConfig, {"window": 0}, "window"),
    (GeneratorConfig, {"singleRequest": "once"}, "singleRequest"),
])
def test_invalid_configs_are_refused_naming_the_field(model: type[Any], data: dict[str, Any], field: str) -> None:
    refused = _refused(model, data, SUT)
    assert refused.fields == [field]
    assert field in refused.message


def test_trigger_needs_an_address_and_builds_its_call() -> None:
    assert _refused(TriggerConfig, {}).fields == ["url"]
    on_sut = _parse(TriggerConfig, {"path": "/ping", "method": "post"}, SUT)
    request = on_sut.request(_env(SUT))
    assert (request.method, request.url, request.path) == ("POST", SUT + "/ping", "/ping")
    assert on_sut.interval_s == 10.0
    direct = _parse(TriggerConfig, {"url": "http://elsewhere:81/health?full=1", "timeoutMs": 100})
    request = direct.request(_env())
    assert request.url == "http://elsewhere:81/health?full=1" and request.path == "/health?full=1"
    assert request.timeout_s == 0.1


def test_moderator_modes() -> None:
    assert _parse(ModeratorConfig, {}).limit() is None
    fixed = _parse(ModeratorConfig, {"mode": "fixed-rate", "ratePerSec": 25})
    assert fixed.limit() == 25
    # A rate is kept but unused in pass-through; switching back needs no new rate.
    passing, _ = apply_patch(ModeratorConfig, fixed, {"mode": "pass-through"})
    assert passing.limit() is None and passing.rate_per_sec == 25
    again, _ = apply_patch(ModeratorConfig, passing, {"mode": "fixed-rate"})
    assert again.limit() == 25


async def test_moderator_holds_few_messages_at_a_fixed_rate() -> None:
    worker = Moderator()
    ctx, published = _ctx(ModeratorConfig())
    ctx.enabled = True
    await worker.setup(ctx)
    assert worker.prefetch == PASS_THROUGH_PREFETCH
    await worker.handle(ctx, {"seq": 1, "x": [1]})
    assert published.bodies == [{"seq": 1, "x": [1]}]  # unchanged
    previous, ctx.config = ctx.config, ModeratorConfig(mode="fixed-rate", rate_per_sec=5)
    await worker.on_config(ctx, previous)
    assert worker.prefetch == FIXED_RATE_MIN_PREFETCH and worker.gate is not None and worker.gate.rate == 5


def test_moderator_prefetch_grows_with_the_rate_within_bounds() -> None:
    assert prefetch_for(None) == PASS_THROUGH_PREFETCH
    assert prefetch_for(1) == prefetch_for(400) == FIXED_RATE_MIN_PREFETCH
    assert prefetch_for(2000) == 20
    assert prefetch_for(10_000) == PASS_THROUGH_PREFETCH


# --- generator singleRequest ---------------------------------------------------------------


async def test_single_request_publishes_one_message_even_when_disabled_and_resets() -> None:
    worker = Generator()
    current = GeneratorConfig(rate_per_sec=0, message={"k": "v"})
    config, enabled = apply_patch(GeneratorConfig, current, {"singleRequest": True})
    assert config.single_request is True and enabled is None
    ctx, published = _ctx(config)
    assert ctx.enabled is False
    await worker.on_config(ctx, current)
    assert len(published.bodies) == 1 and published.bodies[0]["k"] == "v" and published.bodies[0]["seq"] == 1
    assert ctx.config.single_request is False
    assert ctx.config.model_dump(by_alias=True) == {"ratePerSec": 0, "message": {"k": "v"}}
    # Any later patch starts from the reset config: it does not send again.
    later, _ = apply_patch(GeneratorConfig, ctx.config, {"ratePerSec": 0})
    previous, ctx.config = ctx.config, later
    await worker.on_config(ctx, previous)
    assert len(published.bodies) == 1


async def test_single_request_in_the_initial_config_is_sent_at_start() -> None:
    worker = Generator()
    ctx, published = _ctx(parse_config(GeneratorConfig, {"singleRequest": True}))
    await worker.setup(ctx)
    assert len(published.bodies) == 1 and ctx.config.single_request is False


# --- pacing gate ---------------------------------------------------------------------------------


class FakeClock:
    """Time that passes only when someone sleeps."""

    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.t += delay
        await asyncio.sleep(0)


def test_pacer_take_one_hands_out_single_slots() -> None:
    pacer = Pacer(rate=10, origin=0.0)
    assert pacer.take_one(0.0) == 0.0
    assert pacer.take_one(0.0) == pytest.approx(0.1)
    assert pacer.take_one(0.25) == 0.0  # late: what is due goes at once, one at a time
    assert pacer.take_one(0.25) == 0.0
    assert pacer.take_one(0.25) == pytest.approx(0.05)
    assert Pacer(rate=0, origin=0.0).take_one(1.0) is None


async def test_gate_spaces_concurrent_callers_evenly() -> None:
    clock = FakeClock()
    gate = Gate(10, clock=clock.now, sleep=clock.sleep)
    times: list[float] = []

    async def caller() -> None:
        await gate.acquire()
        times.append(clock.now())

    await asyncio.gather(*(caller() for _ in range(6)))
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:])]
    assert times[0] == 100.0 and gaps == [0.1] * 5


async def test_gate_rate_change_applies_from_the_last_slot() -> None:
    clock = FakeClock()
    gate = Gate(2, clock=clock.now, sleep=clock.sleep)
    for _ in range(3):
        await gate.acquire()
    assert clock.now() == pytest.approx(101.0)
    gate.set_rate(20)
    await gate.acquire()
    assert clock.now() == pytest.approx(101.05)
    await gate.acquire()
    assert clock.now() == pytest.approx(101.10)
    gate.set_rate(None)  # no limit: no waiting at all
    for _ in range(100):
        await gate.acquire()
    assert clock.now() == pytest.approx(101.10)


async def test_gate_rate_change_wakes_the_waiting_caller() -> None:
    clock = FakeClock()
    never = asyncio.Event()

    async def sleep_forever(delay: float) -> None:
        await never.wait()

    gate = Gate(0.001, clock=clock.now, sleep=sleep_forever)
    await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    gate.set_rate(1000)
    clock.t += 0.001
    await asyncio.wait_for(waiting, 1)


# --- system under test ----------------------------------------------------------------------------


def test_sut_counts_are_bounded_in_paths() -> None:
    counts = Counts()
    for i in range(MAX_PATHS + 5):
        counts.count("GET", f"/p{i}", 200)
    counts.count("POST", "/p0", 500)
    stats = counts.as_dict()
    assert stats["requests"] == MAX_PATHS + 6 and len(stats["byPath"]) == MAX_PATHS + 1
    assert stats["byPath"][OTHER_PATHS] == 5 and stats["byPath"]["/p0"] == 2
    assert stats["byMethod"] == {"GET": MAX_PATHS + 5, "POST": 1} and stats["byStatus"]["500"] == 1


def test_sut_environment_is_validated_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_SUT_ERROR_RATE", "1.5")
    with pytest.raises(SystemExit, match="CP_SUT_ERROR_RATE"):
        settings_or_exit(SutEnv, "system under test environment")
    monkeypatch.setenv("CP_SUT_ERROR_RATE", "0.25")
    monkeypatch.setenv("CP_SUT_PORT", "9090")
    env = settings_or_exit(SutEnv)
    assert env.sut_error_rate == 0.25 and env.sut_port == 9090 and env.sut_host == "0.0.0.0"


# --- where calls may go ----------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:15672/api/whoami",  # the broker's management API on loopback
    "http://127.0.0.1:8081/",  # loopback, not the SUT's port
    "http://localhost:8080/",
    "http://169.254.169.254/latest/meta-data/",  # a cloud metadata service
    "http://10.0.0.5/",
    "http://[::1]:8080/",
    "http://example.com/",  # public, but not allowed by the operator
    "http://sut.test:15672/",  # an allowed host, on the broker's port
])
def test_calls_go_to_the_sut_and_allowed_targets_only(url: str) -> None:
    env = _env("http://127.0.0.1:8080", allowed_targets=["sut.test"])
    for model, field in ((TriggerConfig, "url"), (ProcessorConfig, "baseUrl")):
        with pytest.raises(ConfigRejected) as caught:
            parse_config(model, {field: url}, config_context(env))
        assert caught.value.fields == [field] and "not allowed" in caught.value.message
    assert parse_config(TriggerConfig, {"url": "http://127.0.0.1:8080/ping"}, config_context(env)).url


def test_operator_networks_and_resolved_addresses() -> None:
    egress = Egress.of("http://172.17.0.3:8080", ["10.1.0.0/16", "api.example.com:443"])
    assert egress.problem("http://172.17.0.3:8080/x") is None, "the SUT, on a private bridge"
    assert egress.problem("http://10.1.2.3:80/") is None, "a network the operator listed"
    assert egress.problem("http://10.2.0.1/") is not None
    assert egress.problem("https://api.example.com/") is None
    assert egress.problem("https://api.example.com:444/") is not None
    # At connect time a listed name must still resolve to a public address.
    assert egress.address_problem(ipaddress.ip_address("127.0.0.1"), 443) == "127.0.0.1 is a loopback address"
    assert egress.address_problem(ipaddress.ip_address("10.1.9.9"), 443) is None
    assert egress.address_problem(ipaddress.ip_address("93.184.216.34"), 443) is None
    assert egress.address_problem(ipaddress.ip_address("93.184.216.34"), 5672) is not None


async def test_a_name_that_resolves_to_loopback_is_refused_at_connect_time() -> None:
    resolver = GuardedResolver(Egress.of(None, ["rebound.example"]))
    try:
        with pytest.raises(OSError, match="resolves only to refused addresses"):
            await resolver.resolve("localhost", 8080)  # as a rebound name would, to loopback
    finally:
        await resolver.close()
