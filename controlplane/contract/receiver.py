"""The signal server every receiver runs: host controller, swarm-controllers and bees.

A receiver declares what it answers once, as a table (signal -> handler), and hands the
messages of its control queue to ``SignalServer.on_message``. The server owns what every
receiver must do the same way:

- a body whose signal or scope disagrees with its routing key is dropped (and logged): a
  receiver acts only on what was addressed to it;
- a signal whose deadline (``ts`` + ``args.timeoutMs``) has passed is acked without running:
  the gateway already told its caller ``timeout`` on the very topic an outcome would use;
- an unknown signal is answered ``ev.error.<signal>.<scope>`` with ``code: unknown-signal``,
  so a caller learns at once instead of waiting for a timeout;
- a repeated signal (same signal, scope and key) re-publishes the outcome it had and runs
  nothing again; the check is made under the handler's lock, so a repeat that arrives while
  the first is running waits for it;
- any exception becomes an error outcome: the ``Failure``'s own code, or ``internal-error``.

Parse errors (``ValidationError``, ``keys.InvalidKey``) propagate: the bus dead-letters them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from controlplane.bus.metrics import KEY_MISMATCHES
from controlplane.contract import keys
from controlplane.contract.dedup import OutcomeMemory
from controlplane.contract.models import Outcome, OutcomeState, Signal, utcnow
from controlplane.logs import get_logger

log = get_logger("receiver")


class Publisher(Protocol):
    async def publish(self, routing_key: str, body: Any, **kwargs: Any) -> None: ...


@dataclass(frozen=True)
class Done:
    """A command's success, when its outcome carries ``details`` besides its state."""

    state: OutcomeState
    details: dict[str, Any] = field(default_factory=dict)


class Failure(Exception):
    """A command failed in a way callers match on: ``code`` becomes the outcome's code."""

    def __init__(self, code: str, message: str, phase: str, retryable: bool = False,
                 state: OutcomeState | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.phase, self.retryable = code, message, phase, retryable
        self.state, self.details = state, details or {}


# A command's result: its success state, or None when another receiver answers for it
# (nothing is published or remembered then).
Command = Callable[[Signal], Awaitable["OutcomeState | Done | None"]]
# Queries answer on their own (a status report, say) and are neither deduplicated nor locked.
Query = Callable[[Signal], Awaitable[None]]


def deadline(sig: Signal) -> datetime | None:
    """When the sender stops waiting for this signal's outcome; None if it did not say."""
    timeout_ms = sig.args.get("timeoutMs")
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)):
        return None
    ts = sig.ts if sig.ts.tzinfo else sig.ts.replace(tzinfo=timezone.utc)
    return ts + timedelta(milliseconds=timeout_ms)


def remaining_s(sig: Signal, default_s: float, now: datetime | None = None) -> float:
    """Seconds left before the signal's deadline (``default_s`` when it has none)."""
    end = deadline(sig)
    if end is None:
        return default_s
    return (end - (now or utcnow())).total_seconds()


def expired(sig: Signal, now: datetime | None = None) -> bool:
    end = deadline(sig)
    return end is not None and end < (now or utcnow())


def disagreement(routing_key: str, sig: Signal) -> str | None:
    """Why a body does not match the key it came with, or None when it does."""
    parsed = keys.parse_key(routing_key)
    if parsed.kind != "sig":
        return f"{parsed.kind} is not a signal"
    if parsed.signal != sig.signal:
        return f"body says signal {sig.signal!r}"
    try:
        scope = sig.scope
    except keys.InvalidKey as exc:
        return f"body has no valid scope: {exc}"
    if scope != parsed.scope:
        return f"body says scope {scope!r}"
    return None


class SignalServer:
    """Serves one receiver's signals; ``on_message`` is a bus handler."""

    def __init__(self, bus: Publisher, name: str, *, commands: Mapping[str, Command],
                 state: Callable[[], OutcomeState], queries: Mapping[str, Query] | None = None,
                 answered_elsewhere: Collection[str] = (),
                 lock_for: Callable[[Signal], asyncio.Lock] | None = None,
                 after: Callable[[Signal, Outcome], Awaitable[None]] | None = None) -> None:
        self.bus, self.name = bus, name
        self.commands = dict(commands)
        self.queries = dict(queries or {})
        overlap = self.commands.keys() & self.queries.keys()
        if overlap:
            raise ValueError(f"signals both command and query: {sorted(overlap)}")
        # Signals the bindings bring here that another receiver answers (a swarm's create
        # reaches its controller too; the host controller answers it).
        self.answered_elsewhere = frozenset(answered_elsewhere)
        self.state = state
        self.memory = OutcomeMemory()
        one_lock = asyncio.Lock()
        self._lock_for = lock_for or (lambda _sig: one_lock)
        self._after = after
        self._inflight: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def on_message(self, routing_key: str, body: dict[str, Any], _message: Any = None) -> None:
        sig = Signal.model_validate(body)
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self.serve(routing_key, sig)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def serve(self, routing_key: str, sig: Signal) -> None:
        slog = log.bind(receiver=self.name, signal=sig.signal, correlation_id=sig.correlation_id,
                        idempotency_key=sig.idempotency_key)
        problem = disagreement(routing_key, sig)
        if problem is not None:
            slog.warning("signal dropped: body disagrees with its routing key", routing_key=routing_key,
                         reason=problem)
            KEY_MISMATCHES.labels("signal").inc()
            return
        if sig.signal in self.answered_elsewhere:
            return
        if expired(sig):
            slog.warning("signal dropped: its deadline passed before it was served", ts=sig.ts.isoformat(),
                         timeout_ms=sig.args.get("timeoutMs"))
            return
        query = self.queries.get(sig.signal)
        if query is not None:
            await query(sig)
            return
        command = self.commands.get(sig.signal)
        if command is None:
            slog.warning("unknown signal answered with an error")
            await self._publish(Outcome.for_signal(
                sig, result="error", state=self.state(), phase="dispatch", code="unknown-signal",
                message=f"{self.name} does not handle {sig.signal!r}; it handles "
                        f"{', '.join(sorted(self.commands.keys() | self.queries.keys()))}",
                retryable=False))
            return
        async with self._lock_for(sig):
            remembered = self.memory.get(sig)
            if remembered is not None:
                slog.info("repeated signal: its outcome is published again")
                await self._publish(remembered)
                return
            outcome = await self._run(command, sig, slog)
            if outcome is None:
                return
            self.memory.remember(sig, outcome)
        await self._publish(outcome)
        slog.info("signal handled", result=outcome.result, code=outcome.code)
        if self._after is not None:
            await self._after(sig, outcome)

    async def _run(self, command: Command, sig: Signal, slog: Any) -> Outcome | None:
        try:
            result = await command(sig)
        except Failure as failure:
            return Outcome.for_signal(sig, result="error", state=failure.state or self.state(),
                                      details=failure.details, phase=failure.phase, code=failure.code,
                                      message=failure.message, retryable=failure.retryable)
        except Exception as exc:  # never leave a caller waiting for a timeout on a bug
            slog.exception("signal failed")
            return Outcome.for_signal(sig, result="error", state=self.state(), phase=sig.signal,
                                      code="internal-error", message=f"{type(exc).__name__}: {exc}",
                                      retryable=False)
        if result is None:
            return None
        if isinstance(result, Done):
            return Outcome.for_signal(sig, result="success", state=result.state, details=result.details)
        return Outcome.for_signal(sig, result="success", state=result)

    async def _publish(self, outcome: Outcome) -> None:
        if not self._closed:
            await self.bus.publish(outcome.routing_key(), outcome)

    async def close(self) -> None:
        """Abandon what is in flight: its messages were never acked, so they go back to the
        queue for whoever serves it next, and no outcome is published for them here."""
        self._closed = True
        tasks = [t for t in self._inflight if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
