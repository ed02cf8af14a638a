"""The engine-pool surface's read model: one pool's engines, streams and statistics, in memory.

Engines come from the pool controller (its provision outcomes and its statuses), streams from
callers' events (recorded here first, then announced on ``ph.control`` for every gateway and
the controller), statistics from the controller's collector. Reads never touch the store:
``GET /engines`` is served from a cached JSON body rebuilt only after a change. The store
keeps a copy for restarts, written through the writer.
"""

from __future__ import annotations

import json
from collections import deque
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from controlplane.contract.models import utcnow
from controlplane.contract.pool import PoolEngine, StreamStarted, StreamState, StreamStatSnapshot, VpnStatus
from controlplane.logs import get_logger
from controlplane.store import Store
from controlplane.store.writer import detach

log = get_logger("gateway.ace")

# Statistics older than this are not loaded back after a restart (and are purged).
STATS_RETENTION = timedelta(days=1)
ENDED_RETENTION = timedelta(days=7)


class PoolView:
    def __init__(self, store: Store, pool_id: str, history: int, vpn_configured: bool) -> None:
        self.store, self.pool_id, self.history = store, pool_id, history
        self.engines: dict[str, PoolEngine] = {}
        # When the controller stated what ``engines`` holds: outcomes and statuses come on two
        # queues, so a status taken before a provision may arrive after its outcome.
        self.engines_as_of: datetime | None = None
        self.streams: dict[str, StreamState] = {}
        self.stats: dict[str, deque[StreamStatSnapshot]] = {}
        self.vpn = VpnStatus.disabled() if not vpn_configured else VpnStatus(enabled=True, status="unknown")
        self._started_on: dict[str, set[str]] = {}  # container id -> its started streams
        self._engines_json: bytes | None = None

    async def load(self) -> None:
        saved = await self.store.load_pool(self.pool_id, utcnow() - STATS_RETENTION)
        self._set_engines(saved["engines"])
        for raw in saved["streams"]:
            self._put_stream(StreamState.model_validate(raw))
        for stream_id, snapshots in saved["stats"].items():
            self.stats[stream_id] = deque((StreamStatSnapshot.model_validate(s) for s in snapshots),
                                          maxlen=self.history)
        log.info("engine pool loaded", pool=self.pool_id, engines=len(self.engines), streams=len(self.streams))

    # --- engines ---------------------------------------------------------------------------

    def engines_json(self) -> bytes:
        if self._engines_json is None:
            self._engines_json = json.dumps([self.engine_view(e) for e in self.engines.values()]).encode()
        return self._engines_json

    def engine_view(self, engine: PoolEngine) -> dict[str, Any]:
        view = engine.api_view()
        view["streams"] = sorted(self._started_on.get(engine.container_id, ()))
        return view

    def replace_engines(self, engines: list[dict[str, Any]], as_of: datetime | None = None) -> None:
        """The controller's whole list (from its status, or a collection's outcome), unless
        what is known is newer than ``as_of``."""
        if as_of is not None and self.engines_as_of is not None and as_of < self.engines_as_of:
            return
        self._set_engines(engines)
        self._persist_engines()
        self.saw_engines_at(as_of)

    def saw_engines_at(self, as_of: datetime | None) -> None:
        if as_of is not None and (self.engines_as_of is None or as_of > self.engines_as_of):
            self.engines_as_of = as_of

    def add_engine(self, engine: dict[str, Any]) -> None:
        parsed = _engine(engine)
        if parsed is not None:
            self.engines[parsed.container_id] = parsed
            self._changed_engines()

    def remove_engines(self, container_ids: list[str]) -> None:
        if any(self.engines.pop(cid, None) is not None for cid in list(container_ids)):
            self._changed_engines()

    def find_engine(self, ref: str) -> PoolEngine | None:
        """By full id, unique id prefix (12 or more characters) or container name."""
        engine = self.engines.get(ref)
        if engine is not None or not ref:
            return engine
        found = [e for e in self.engines.values()
                 if (len(ref) >= 12 and e.container_id.startswith(ref)) or e.container_name == ref]
        return found[0] if len(found) == 1 else None

    def engine_at(self, host: str, port: int) -> PoolEngine | None:
        return next((e for e in self.engines.values() if e.port == port and e.host == host), None)

    def _set_engines(self, engines: list[dict[str, Any]]) -> None:
        parsed = (_engine(e) for e in engines)
        self.engines = {e.container_id: e for e in parsed if e is not None}
        self._engines_json = None

    def _changed_engines(self) -> None:
        self._engines_json = None
        self._persist_engines()

    def _persist_engines(self) -> None:
        detach(self.store.save_pool_engines(self.pool_id, [e.model_dump(mode="json") for e in self.engines.values()]),
               "save pool engines")

    # --- streams ---------------------------------------------------------------------------

    def container_of(self, event: StreamStarted) -> str:
        """The engine a started stream plays on: the caller's container id resolved to the
        engine's full id, else the engine at the event's address, else what the caller said."""
        engine = self.find_engine(event.container_id) if event.container_id else None
        if engine is None:
            engine = self.engine_at(event.engine.host, event.engine.port)
        if engine is not None:
            return engine.container_id
        return event.container_id or f"{event.engine.host}:{event.engine.port}"

    def start_stream(self, event: StreamStarted) -> tuple[StreamState, bool]:
        """The stream the event describes, and whether it changed anything (a repeat does not)."""
        stream_id = event.stream_id()
        known = self.streams.get(stream_id)
        fields = dict(key_type=event.stream.key_type, key=event.stream.key, container_id=self.container_of(event),
                      playback_session_id=event.session.playback_session_id, stat_url=event.session.stat_url,
                      command_url=event.session.command_url, is_live=bool(event.session.is_live))
        if known is not None and known.status == "started" and \
                known.model_dump(include=set(fields)) == fields:
            return known, False
        state = StreamState(id=stream_id, started_at=utcnow(), status="started", **fields)
        self._put_stream(state)
        return state, True

    def end_stream(self, stream_id: str, when: datetime | None = None) -> tuple[StreamState | None, bool]:
        """The stream and whether this ended it; an unknown or already ended one changes nothing."""
        known = self.streams.get(stream_id)
        if known is None or known.status == "ended":
            return known, False
        state = known.model_copy(update={"status": "ended", "ended_at": when or utcnow()})
        self._put_stream(state)
        return state, True

    def observe_stream(self, raw: dict[str, Any]) -> StreamState | None:
        """A stream as another gateway recorded it; the newer state wins."""
        try:
            state = StreamState.model_validate(raw)
        except ValidationError:
            return None
        known = self.streams.get(state.id)
        if known == state or (known is not None and known.status == "ended" and state.status == "started"
                              and state.started_at <= known.started_at):
            return None
        self._put_stream(state)
        return state

    def list_streams(self, status: str | None, container_id: str | None) -> list[dict[str, Any]]:
        if container_id is not None:
            engine = self.find_engine(container_id)
            container_id = engine.container_id if engine else container_id
        return [s.to_dict() for s in self.streams.values()
                if (status is None or s.status == status) and (container_id is None or s.container_id == container_id)]

    def started_count(self) -> int:
        return sum(len(ids) for ids in self._started_on.values())

    def _put_stream(self, state: StreamState) -> None:
        previous = self.streams.get(state.id)
        if previous is not None:
            self._started_on.get(previous.container_id, set()).discard(state.id)
        self.streams[state.id] = state
        if state.status == "started":
            self._started_on.setdefault(state.container_id, set()).add(state.id)
        self._engines_json = None  # engines list their started streams

    # --- statistics ----------------------------------------------------------------------------

    def add_stats(self, items: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        """A collection round; what was taken, for the store."""
        taken: list[tuple[str, dict[str, Any]]] = []
        for item in items:
            try:
                stream_id, snapshot = str(item["stream_id"]), StreamStatSnapshot.model_validate(item["snapshot"])
            except (KeyError, TypeError, ValidationError):
                continue
            if stream_id not in self.streams:
                continue
            self.stats.setdefault(stream_id, deque(maxlen=self.history)).append(snapshot)
            taken.append((stream_id, snapshot.to_dict()))
        return taken

    def stats_of(self, stream_id: str, since: datetime | None) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.stats.get(stream_id, ()) if since is None or s.ts >= since]


def _engine(raw: dict[str, Any]) -> PoolEngine | None:
    try:
        return PoolEngine.model_validate(raw)
    except ValidationError as exc:
        log.warning("engine record ignored", error=str(exc))
        return None
