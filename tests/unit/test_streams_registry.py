"""The streams registry's memory: TTLs, exact session counts, rendering, and the contract's keys."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from controlplane.contract import keys
from controlplane.contract.streams import NegotiationReply, StreamAdvertise
from controlplane.contract.topology import default_topology
from controlplane.gateway.surfaces.streams.registry import StreamRegistry

TTL = 30.0


def advert(**overrides: object) -> StreamAdvertise:
    return StreamAdvertise.model_validate({"name": "cam", "stream_type": "ndi", "publisher_id": "p",
                                           "protocol": "ndi", "address": "10.0.0.1", "port": 5960, **overrides})


def offer() -> dict[str, object]:
    return {"publisher_address": "10.0.0.1", "publisher_port": 5960, "protocol": "ndi", "transport_config": {}}


def consumer(name: str = "c") -> dict[str, object]:
    return {"consumer_id": name, "consumer_address": "10.0.0.2", "consumer_port": None}


def test_a_stream_lives_for_its_ttl_and_a_heartbeat_moves_it_but_never_after_it() -> None:
    registry = StreamRegistry(TTL)
    stream = registry.advertise(str(uuid.uuid4()), advert(), now=1000.0)
    assert registry.expired(1000.0 + TTL) == ([], [])
    assert registry.heartbeat(stream.id, 1020.0) is stream
    assert registry.expired(1040.0) == ([], [])
    assert registry.expired(1050.1)[0] == [stream]
    # Due is due: a heartbeat arriving after its time does not revive it ahead of the sweeper.
    assert registry.heartbeat(stream.id, 1050.1) is None


def test_session_counts_follow_every_change_exactly() -> None:
    registry = StreamRegistry(TTL)
    stream = registry.advertise(str(uuid.uuid4()), advert(), now=0.0)
    sessions = [registry.open_session(str(uuid.uuid4()), stream, offer(), consumer(f"c{i}"), 1.0)[0] for i in range(3)]
    assert json.loads(stream.render())["active_sessions"] == 3
    registry.remove_session(sessions[0].id)
    assert registry.remove_session(sessions[0].id) is None  # twice is once
    assert json.loads(stream.render())["active_sessions"] == 2
    gone, closed = registry.remove_stream(stream.id)
    assert gone is stream and {s.id for s in closed} == {s.id for s in sessions[1:]}
    assert registry.sessions == {} and registry.streams == {}


def test_a_session_of_an_unknown_stream_is_not_kept() -> None:
    registry = StreamRegistry(TTL)
    body = {"session_id": str(uuid.uuid4()), "stream_id": str(uuid.uuid4()), "publisher_port": 1}
    assert registry.add_session(body, 0.0, TTL) is None
    assert registry.sessions == {}


def test_expired_sessions_of_an_expired_stream_end_with_it_not_alone() -> None:
    registry = StreamRegistry(TTL)
    stream = registry.advertise(str(uuid.uuid4()), advert(), now=0.0)
    kept = registry.advertise(str(uuid.uuid4()), advert(), now=0.0)
    with_stream, _ = registry.open_session(str(uuid.uuid4()), stream, offer(), consumer(), 0.0)
    alone, _ = registry.open_session(str(uuid.uuid4()), kept, offer(), consumer(), 0.0)
    registry.heartbeat(kept.id, 20.0)
    streams, sessions = registry.expired(31.0)
    assert streams == [stream] and sessions == [alone]
    assert with_stream not in sessions


def test_peer_heartbeats_never_move_a_time_back_and_are_not_echoed() -> None:
    registry = StreamRegistry(TTL)
    stream = registry.advertise(str(uuid.uuid4()), advert(), now=100.0)
    registry.heartbeat(stream.id, 110.0)
    assert registry.take_refreshed() == ({stream.id: 110.0}, {})
    registry.refresh({stream.id: 105.0}, {})
    assert stream.last_heartbeat == 110.0 and stream.expires_at == 110.0 + TTL
    registry.refresh({stream.id: 120.0, str(uuid.uuid4()): 1.0}, {})
    assert stream.last_heartbeat == 120.0 and stream.expires_at == 120.0 + TTL
    assert registry.take_refreshed() == ({}, {})  # what others told us is theirs to announce


def test_rendering_is_redone_only_after_a_change() -> None:
    registry = StreamRegistry(TTL)
    stream = registry.advertise(str(uuid.uuid4()), advert(config={"fps": 30}), now=0.0)
    first = stream.render()
    assert stream.render() is first
    registry.heartbeat(stream.id, 5.0)
    assert stream.render() is not first and json.loads(stream.render())["last_heartbeat"].endswith("05Z")
    listed = json.loads(registry.streams_json())
    assert list(listed[0]) == ["id", "name", "stream_type", "publisher_id", "protocol", "address", "port",
                               "entity_id", "device_id", "config", "metadata", "advertised_at", "last_heartbeat",
                               "active_sessions"]
    assert json.loads(registry.streams_json("audio")) == []
    state = json.loads(registry.state_json())
    assert len(state["streams"]) == 1 and state["sessions"] == [] and len(state["stream_types"]) == 11


def test_reply_contract_is_strict_about_what_it_names() -> None:
    assert NegotiationReply.model_validate({"accepted": False, "reason": "busy"}).reason == "busy"
    for bad in ({}, {"accepted": "yes"}, {"accepted": 1}, {"accepted": True, "port": "1"},
                {"accepted": True, "protocol": "pigeon"}, {"accepted": True, "transport_config": []}):
        with pytest.raises(ValidationError):
            NegotiationReply.model_validate(bad)


def test_the_publisher_queue_of_the_topology_binds_the_request_key() -> None:
    stream_id = str(uuid.uuid4())
    decl = default_topology().templates.stream_publisher_queue.render(stream_id=stream_id)
    assert [b.key for b in decl.bindings] == [keys.stream_request_key(stream_id)]
    assert decl.exclusive
    with pytest.raises(keys.InvalidKey):
        keys.stream_request_key("not-a-uuid")
    with pytest.raises(keys.InvalidKey):
        keys.registry_event_key("stream-renamed", stream_id)


def test_the_gateway_may_publish_the_registry_events_and_nothing_next_to_them() -> None:
    import re

    from controlplane.bus.accounts import gateway_grant

    pattern = re.compile(gateway_grant("gw").topic_write)
    stream_id = str(uuid.uuid4())
    for event in keys.REGISTRY_EVENTS:
        scope = {"stream-heartbeats": "gw", "stream-sessions-started": "gw",
                 "stream-type-created": "lidar_v2"}.get(event, stream_id)
        assert pattern.match(keys.registry_event_key(event, scope)), event
    assert pattern.match(keys.stream_request_key(stream_id))
    assert not pattern.match(f"ev.ready.swarm-remove.{stream_id}")
    assert not pattern.match(f"ev.ready.stream-advertised.{stream_id}.extra")


def test_a_stream_publisher_may_listen_for_stream_requests_and_answer_nothing_else() -> None:
    import re

    from controlplane.bus.accounts import stream_publisher_grant

    grant = stream_publisher_grant()
    stream_id = str(uuid.uuid4())
    queue = default_topology().templates.stream_publisher_queue.render(stream_id=stream_id)
    assert re.match(grant.configure, queue.name) and re.match(grant.read, queue.name)
    assert re.match(grant.topic_read, keys.stream_request_key(stream_id))
    assert not re.match(grant.topic_read, f"sig.swarm-create.{stream_id}")
    replies = default_topology().templates.replies_queue.render(owner="gw1", token="0a1b2c")
    assert re.match(grant.topic_write, replies.bindings[0].key)
    for forged in ("sig.swarm-create.x", keys.registry_event_key(keys.STREAM_EXPIRED, stream_id), "reply.gw1"):
        assert not re.match(grant.topic_write, forged), forged
    assert not re.match(grant.write, "amq.default") and not re.match(grant.configure, "ph.control.host-controller")
