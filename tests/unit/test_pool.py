"""Pure logic of engine pools: ports, the AceStream preset, the pool's configuration, engine
specs from labels and back, and the gateway's stream read model."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from controlplane.config import Settings
from controlplane.contract.models import utcnow
from controlplane.contract.pool import AceProvisionRequest, PoolSpec, ProvisionRequest, StreamStarted, acestream_env
from controlplane.controller.engines import engine_from, plan_provision, release_ports
from controlplane.controller.ports import PortAllocator, PortsExhausted, PortTaken
from controlplane.gateway.surfaces.ace.view import PoolView
from controlplane.runtime.model import ContainerInfo
from controlplane.scenarios import PoolConfigError, configured_pool, load_catalog


def small_pool(**fields: Any) -> PoolSpec:
    return PoolSpec.model_validate({"hostPorts": "19000-19002", "httpPorts": "40000-40003",
                                    "httpsPorts": "45000-45003", "image": "engine:1", **fields})


def test_ports_are_never_handed_out_twice_until_given_back() -> None:
    ports = PortAllocator(small_pool())
    taken = [ports.take("host") for _ in range(3)]
    assert sorted(taken) == [19000, 19001, 19002]
    with pytest.raises(PortsExhausted, match="every host port of 19000-19002 is in use"):
        ports.take("host")
    ports.release("host", 19001)
    assert ports.take("host") == 19001 and ports.free("host") == 0


def test_a_port_given_back_is_not_reused_at_once() -> None:
    ports = PortAllocator(small_pool())
    first = ports.take("http")
    ports.release("http", first)
    assert ports.take("http") != first  # the search goes on from the last port handed out


def test_ports_held_by_existing_engines_and_ports_asked_for() -> None:
    ports = PortAllocator(small_pool())
    ports.hold("host", 19000)
    ports.hold("host", 25000)  # outside the range: held all the same
    assert ports.take("host") == 19001
    with pytest.raises(PortTaken):
        ports.take_exact("host", 25000)
    assert ports.take_exact("host", 26000) == 26000
    assert ports.take("https", avoid=(45000,)) == 45001


def test_acestream_conf_is_built_unless_given_and_then_passed_verbatim() -> None:
    built = acestream_env({"EXTRA": "x"}, 40117, 45109)
    assert built["CONF"] == "--http-port=40117\n--https-port=45109\n--bind-all"
    assert (built["HTTP_PORT"], built["HTTPS_PORT"], built["BIND_ALL"], built["EXTRA"]) == ("40117", "45109", "true", "x")
    assert acestream_env({"CONF": ""}, 1, 2)["CONF"] == ""
    assert acestream_env({"CONF": "--custom"}, 1, 2)["CONF"] == "--custom"


def test_pool_bounds_and_ranges_are_checked() -> None:
    with pytest.raises(ValidationError, match="minReplicas .3. is above maxReplicas .2."):
        small_pool(minReplicas=3, maxReplicas=2)
    with pytest.raises(ValidationError, match="must read FIRST-LAST"):
        small_pool(hostPorts="19000")
    with pytest.raises(ValidationError, match="ends before it starts"):
        small_pool(hostPorts="19010-19000")


def test_the_configured_pool_is_the_scenario_with_the_settings_on_top() -> None:
    settings = Settings(ace_image="engine:2", vpn_container="gluetun",
                        ace_pool={"maxReplicas": 7, "health": {"intervalS": 1}, "min_free": 2})
    plan = configured_pool(settings, load_catalog(settings.scenarios_dir))
    assert plan is not None and plan.pool is not None and not plan.bees
    pool = plan.pool
    assert (pool.image, pool.max_replicas, pool.min_free, pool.vpn_container) == ("engine:2", 7, 2, "gluetun")
    # Nested fields are merged, not replaced: the probe path stays the scenario's.
    assert pool.health.interval_s == 1 and pool.health.path == "/server/api?api_version=3&method=get_status"
    with pytest.raises(PoolConfigError, match="CP_ACE_POOL: maxReplicas"):
        configured_pool(Settings(ace_pool={"maxReplicas": 0}), load_catalog(settings.scenarios_dir))
    assert configured_pool(Settings(ace_pool_id=""), load_catalog(settings.scenarios_dir)) is None


def test_an_engine_is_read_back_from_the_labels_it_was_made_with() -> None:
    pool = small_pool()
    ports = PortAllocator(pool)
    request = AceProvisionRequest(labels={"stream_id": "ch-1"}, env={"EXTRA_ENV": "X"})
    made = plan_provision(Settings(), "ace", pool, "host", ports, "acestream", request)
    again = plan_provision(Settings(), "ace", pool, "host", ports, "acestream", request)
    assert made.spec.name != again.spec.name  # no name race between concurrent provisions
    assert made.spec.ports == {f"{made.ports['http']}/tcp": made.ports["hostHttp"]}
    assert made.spec.network == "bridge" and made.spec.publish_address == "127.0.0.1"
    info = ContainerInfo(id="c" * 64, name=made.spec.name, image="engine:1", state="running", exit_code=None,
                         labels=made.spec.labels, started_at=None, ports={})
    engine = engine_from(info, pool)
    assert (engine.port, engine.container_http_port, engine.container_https_port) == (
        made.ports["hostHttp"], made.ports["http"], made.ports["https"])
    assert engine.labels == {"stream_id": "ch-1", "acestream.http_port": str(made.ports["http"]),
                             "acestream.https_port": str(made.ports["https"]),
                             "host.http_port": str(made.ports["hostHttp"])}
    release_ports(ports, made.ports)
    release_ports(ports, again.ports)
    assert ports.free("host") == 3 and ports.free("http") == 4


def test_a_caller_cannot_forge_the_control_planes_labels() -> None:
    with pytest.raises(ValidationError, match="controlplane.owner"):
        ProvisionRequest(image="engine:1", labels={"controlplane.owner": "someone-else"})


def test_a_failed_provision_plan_gives_its_ports_back() -> None:
    pool = small_pool()
    ports = PortAllocator(pool)
    ports.take_exact("host", 19002)
    request = ProvisionRequest(image="engine:1", ports={"80/tcp": None, "81/tcp": 19002})
    with pytest.raises(PortTaken):
        plan_provision(Settings(), "ace", pool, "host", ports, "generic", request)
    assert ports.free("host") == 2  # the port taken for 80/tcp came back


class _Store:
    def save_pool_engines(self, *_: Any) -> Any:
        import asyncio
        future = asyncio.get_event_loop().create_future()
        future.set_result(None)
        return future


def started(stream_id: str | None, container_id: str = "c" * 64, port: int = 19000) -> StreamStarted:
    return StreamStarted.model_validate({
        "container_id": container_id, "engine": {"host": "127.0.0.1", "port": port},
        "stream": {"key_type": "infohash", "key": "abc"},
        "session": {"playback_session_id": "s1", "stat_url": f"http://127.0.0.1:{port}/ace/stat/abc/s1",
                    "command_url": f"http://127.0.0.1:{port}/ace/cmd/abc/s1", "is_live": 1},
        "labels": {"stream_id": stream_id} if stream_id else {}})


async def test_stream_events_are_idempotent_and_never_end_a_stream_by_a_guess() -> None:
    view = PoolView(_Store(), "ace", history=3, vpn_configured=False)  # type: ignore[arg-type]
    now = utcnow().isoformat()
    view.replace_engines([{"container_id": "c" * 64, "container_name": "e1", "host": "127.0.0.1", "port": 19000,
                           "first_seen": now, "last_seen": now}])
    first, changed = view.start_stream(started("ch-1", container_id="c" * 12))
    assert changed and first.container_id == "c" * 64  # a short id resolves to the engine's own
    again, changed = view.start_stream(started("ch-1", container_id="c" * 12))
    assert not changed and again == first
    assert json.loads(view.engines_json())[0]["streams"] == ["ch-1"]
    unnamed, _ = view.start_stream(started(None, container_id=""))
    assert unnamed.id == "abc|s1" and unnamed.container_id == "c" * 64  # found by its address
    ended, changed = view.end_stream("ch-1")
    assert changed and ended is not None and ended.status == "ended"
    assert view.end_stream("ch-1")[1] is False and view.end_stream("nope") == (None, False)
    assert json.loads(view.engines_json())[0]["streams"] == ["abc|s1"]
    assert view.started_count() == 1
    # Another gateway's older "started" does not bring an ended stream back.
    assert view.observe_stream({**first.to_dict(), "started_at": (first.started_at - timedelta(seconds=1)).isoformat()}) is None
    assert view.streams["ch-1"].status == "ended"


def test_statistics_are_bounded_per_stream_and_filtered_by_time() -> None:
    view = PoolView(_Store(), "ace", history=3, vpn_configured=False)  # type: ignore[arg-type]
    view.start_stream(started("ch-1"))
    base = utcnow()
    items = [{"stream_id": "ch-1", "snapshot": {"ts": (base + timedelta(seconds=i)).isoformat(), "peers": i}}
             for i in range(5)] + [{"stream_id": "unknown", "snapshot": {"ts": base.isoformat()}}]
    assert len(view.add_stats(items)) == 5
    assert [s["peers"] for s in view.stats_of("ch-1", None)] == [2, 3, 4]
    assert [s["peers"] for s in view.stats_of("ch-1", base + timedelta(seconds=4))] == [4]


def test_the_collector_polls_only_the_pools_own_engines() -> None:
    from controlplane.contract.models import OutcomeState
    from controlplane.contract.pool import PoolEngine
    from controlplane.controller.pool import ActiveStream, PoolPolicy

    policy = PoolPolicy(None, None, Settings(), "ace", small_pool(), "host", lambda _: None, OutcomeState)  # type: ignore[arg-type]
    now = utcnow()
    policy.engines["c" * 64] = PoolEngine(container_id="c" * 64, host="127.0.0.1", port=19000, first_seen=now,
                                          last_seen=now)

    def polled(container_id: str, url: str) -> bool:
        return policy._may_poll(ActiveStream(container_id, url, now))

    assert polled("c" * 64, "http://127.0.0.1:19000/ace/stat/x/s1")
    assert not polled("c" * 64, "http://127.0.0.1:15672/api/whoami")  # another port of the host
    assert not polled("c" * 64, "http://10.0.0.1:19000/ace/stat/x/s1")  # another host
    assert not polled("d" * 64, "http://127.0.0.1:19000/ace/stat/x/s1")  # no engine of the pool


def test_the_engine_pool_api_mounts_under_any_prefix_even_none() -> None:
    from aiohttp import web

    from controlplane.gateway.app import BASE_OPERATIONS
    from controlplane.gateway.surface import mount
    from controlplane.gateway.surfaces import surfaces_for

    for prefix in ("/ace", "/pools/ace", ""):
        access: dict[tuple[str, str], str] = {}
        # The streams registry has /streams too: at the root, one of them takes a prefix.
        settings = Settings(ace_prefix=prefix, streams_prefix="" if prefix else "/registry")
        ops = mount(web.Application(), surfaces_for(settings), claimed=BASE_OPERATIONS, access=access)
        paths = {(op.method, op.path) for op in ops}
        assert ("POST", f"{prefix}/provision/acestream") in paths and ("GET", f"{prefix}/vpn/status") in paths
        assert access[("GET", f"{prefix}/by-label")] == "protected"
        # Its metrics are the gateway's own /metrics when there is no prefix, never claimed twice.
        assert (("GET", f"{prefix}/metrics") in paths) is bool(prefix)
    assert not [op for op in mount(web.Application(), surfaces_for(Settings(ace_pool_id="")))
                if op.path.startswith("/ace")]
    with pytest.raises(ValueError, match="CP_STREAMS_PREFIX"):
        Settings(ace_prefix="")


def test_a_controller_on_the_engines_network_reaches_them_at_their_own_address() -> None:
    from controlplane.contract.models import OutcomeState
    from controlplane.contract.pool import PoolEngine
    from controlplane.controller.pool import PoolPolicy

    now = utcnow()
    engine = PoolEngine(container_id="c" * 64, host="127.0.0.1", port=19000, first_seen=now, last_seen=now,
                        ip="172.18.0.5", container_http_port=40000)
    published = PoolPolicy(None, None, Settings(), "ace", small_pool(), "host", lambda _: None, OutcomeState)  # type: ignore[arg-type]
    inside = PoolPolicy(None, None, Settings(), "ace", small_pool(probeAddress="container"), "host",  # type: ignore[arg-type]
                        lambda _: None, OutcomeState)
    assert published._engine_url(engine) == "http://127.0.0.1:19000"
    assert inside._engine_url(engine) == "http://172.18.0.5:40000"
