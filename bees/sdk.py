"""The bee runtime: control signals, status reports and work plumbing around a ``Worker``.

A worker only says what one unit of work is (``tick`` for producers, ``handle`` for
consumers) and which config it accepts. Connecting, obeying ``config-update`` and
``status-request``, switching work on and off and reporting status are the same for every
bee, so they live here once. Signals are served by the signal server every receiver shares;
the bee's config and switch are kept in its last-value queue, so a restarted container
carries on where it was rather than where its environment started it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import Any, Generic, Literal, TypeVar

from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel

from controlplane.bus import Bus, Consumer
from controlplane.contract import keys
from controlplane.contract.redact import redact
from controlplane.contract.models import Outcome, OutcomeState, Signal, Status, utcnow
from controlplane.contract.receiver import Failure, SignalServer
from controlplane.contract.topology import QueueDecl, Topology, default_topology, load_topology
from controlplane.bus import snapshot
from controlplane.logs import configure, get_logger
from bees.env import BeeEnv, load_env_or_exit
from bees.patching import ConfigRejected, apply_patch, config_context, parse_config
from bees.stats import Totals, rates

C = TypeVar("C", bound=BaseModel)

# Pause after a failed producer step, so a broker outage does not become a busy loop.
ERROR_BACKOFF_S = 1.0
CONTROL_PREFETCH = 16
# How long a retired work consumer may finish the messages it has in hand before its
# channel is closed and what is left goes back to the queue.
DRAIN_S = 10.0

StatusKind = Literal["status-full", "status-delta"]


class Worker(Generic[C]):
    """What a bee does. Subclasses set ``Config`` and override ``tick`` and/or ``handle``.

    The other methods are hooks with no-op defaults, for workers that hold resources
    (``setup``/``teardown``), react to a new config (``on_config``) or report more than the
    counters (``report``).
    """

    Config: type[C]
    # Messages of work-in handled at once (``handle`` runs concurrently up to this many).
    # A worker may change it from ``setup`` or ``on_config``; the consumer follows.
    prefetch: int = 16

    async def setup(self, ctx: BeeContext[C]) -> None:
        """Once, after connecting and before any work; ``teardown`` follows on stop."""

    async def teardown(self, ctx: BeeContext[C]) -> None:
        """On stop, whenever ``setup`` ran; release what it acquired."""

    async def on_config(self, ctx: BeeContext[C], previous: C) -> None:
        """After a ``config-update`` was applied: ``ctx.config`` is the new config already.

        Raising makes the signal's outcome an error; the new config stays applied.
        """

    def report(self, ctx: BeeContext[C]) -> dict[str, Any]:
        """Extra fields for the ``data`` of every status report."""
        return {}

    async def tick(self, ctx: BeeContext[C]) -> float | None:
        """Producers: do one step of work while enabled.

        Return the seconds until the next step, or None to wait for the next config or
        enabled change. The runtime calls again early when the config changes.
        """
        return None

    async def handle(self, ctx: BeeContext[C], body: dict[str, Any]) -> None:
        """Consumers: handle one message from the work-in queue; raising counts an error."""
        raise NotImplementedError(f"{type(self).__name__} does not consume work")


class BeeContext(Generic[C]):
    """What a worker sees: identity, current config, the on/off switch, counters, output."""

    def __init__(self, env: BeeEnv, config: C) -> None:
        self.env = env
        self.config = config
        self.enabled = env.enabled
        self.totals = Totals()
        self._bus: Bus | None = None
        self._out: tuple[str, str] | None = None  # (exchange, routing key)

    @property
    def swarm_id(self) -> str:
        return self.env.swarm_id

    @property
    def state(self) -> str:
        return "running" if self.enabled else "idle"

    def now(self) -> float:
        """Monotonic clock, for pacing."""
        return asyncio.get_running_loop().time()

    async def publish(self, body: dict[str, Any]) -> None:
        """Publish one work message to this bee's work-out queue (confirmed by the broker)."""
        if self._bus is None or self._out is None:
            raise RuntimeError("this bee has no work-out queue (CP_WORK_OUT is not set)")
        exchange, routing_key = self._out
        try:
            await self._bus.publish(routing_key, body, exchange=exchange)
        except Exception:
            self.totals.errors += 1
            raise
        self.totals.published += 1


class WorkConsumer:
    """A consumer of work-in and how many of its messages are being handled."""

    def __init__(self, prefetch: int) -> None:
        self.prefetch = prefetch
        self.consumer: Consumer | None = None
        self.handling = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def started(self) -> None:
        self.handling += 1
        self.idle.clear()

    def finished(self) -> None:
        self.handling -= 1
        if self.handling == 0:
            self.idle.set()


class Bee(Generic[C]):
    """One running bee. ``run`` serves until ``stop`` is called."""

    def __init__(self, env: BeeEnv, worker: Worker[C], topology: Topology | None = None) -> None:
        self.env = env
        self.worker = worker
        self.topology = topology or (load_topology(env.topology_file) if env.topology_file else default_topology())
        # Configs are validated knowing the environment, e.g. whether CP_SUT_URL is set.
        self._validation = config_context(env)
        # Raises ConfigRejected: a bee must not start on a config its worker refuses.
        self.ctx: BeeContext[C] = BeeContext(env, parse_config(worker.Config, env.bee_config, self._validation))
        self.log = get_logger("bee").bind(swarm_id=env.swarm_id, role=env.role, instance=env.instance)
        self._bus: Bus | None = None
        self._server: SignalServer | None = None
        self._saver = snapshot.LatestSaver(self._save_state)
        self._unsaved: set[str] = set()  # correlation ids whose change no save has covered yet
        # What this container was started with: a snapshot of another starting point (a bee
        # replaced by a new spec) is not this bee's state.
        self._base = snapshot.fingerprint(env.bee_config, env.enabled)
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._switch = asyncio.Lock()
        self._work_in: QueueDecl | None = None
        self._work: WorkConsumer | None = None
        self._draining: set[asyncio.Task[None]] = set()
        self._last_at = 0.0
        self._last_totals = Totals()

    # --- lifecycle ------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Connect, declare, announce with ``status-full`` and serve until stopped."""
        env = self.env
        bus = await self._connect()
        if bus is None:
            return
        self._bus = bus
        self.ctx._bus = bus
        # aio-pika restores channels and consumers itself; the producer, which may be
        # backing off after failed publishes, is woken so work resumes at once.
        bus.connection.reconnect_callbacks.add(self._on_reconnect)
        tasks: list[asyncio.Task[None]] = []
        control: Consumer | None = None
        set_up = False
        try:
            await self._restore()
            await self._declare_work()
            await self.worker.setup(self.ctx)
            set_up = True
            self._server = SignalServer(bus, f"{env.role}.{env.instance}", commands={"config-update": self._apply},
                                        queries={"status-request": self._status_request}, state=self._state,
                                        after=self._after_command)
            # Commands still run one at a time and in order (the server's lock is first come, first
            # served); a prefetch lets the next one arrive while the current one is handled.
            control = await bus.consume(self.control_queue(), self._server.on_message, prefetch=CONTROL_PREFETCH)
            await self._sync_work_consumer()
            self._last_at = self.ctx.now()
            await self._publish_status("status-full")
            self.log.info("bee started", enabled=self.ctx.enabled, work_in=env.work_in, work_out=env.work_out)
            tasks = [asyncio.create_task(self._produce()), asyncio.create_task(self._report())]
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            work, self._work = self._work, None
            for consumer in (control, work.consumer if work else None):
                if consumer is not None:
                    with suppress(Exception):
                        await consumer.cancel()
            if self._server is not None:
                await self._server.close()
            for task in self._draining:
                task.cancel()
            await asyncio.gather(*self._draining, return_exceptions=True)
            if set_up:
                try:
                    await self.worker.teardown(self.ctx)
                except Exception as exc:
                    self.log.warning("worker teardown failed", error=repr(exc))
            with suppress(Exception):
                async with asyncio.timeout(2):
                    await self._publish_status("status-delta", state="stopped")
            await bus.close()
            self.log.info("bee stopped")

    async def _connect(self) -> Bus | None:
        """Connect, waiting for the broker; None when stopped before it answered."""
        env = self.env
        bus = Bus(env.amqp_url.get_secret_value(), self.topology, name=env.instance)
        connecting = asyncio.create_task(bus.connect(declare_exchanges=False))
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if connecting.done():
            return connecting.result()
        connecting.cancel()
        with suppress(asyncio.CancelledError):
            await connecting
        self.log.info("stopped before the broker answered")
        return None

    def _on_reconnect(self, *_: object) -> None:
        self.log.info("reconnected to the broker")
        self._changed.set()

    # --- declarations ---------------------------------------------------------------

    def control_queue(self) -> QueueDecl:
        return self.topology.templates.bee_queue.render(role=self.env.role, instance=self.env.instance)

    def state_queue(self) -> QueueDecl:
        return self.topology.templates.state_queue.render(role=self.env.role, instance=self.env.instance)

    def work_queue(self, suffix: str) -> QueueDecl:
        keys.check_slug(suffix, "queue suffix")
        return self.topology.templates.work_queue.render(swarm_id=self.env.swarm_id, suffix=suffix)

    def work_queue_names(self) -> list[str]:
        return [self.work_queue(s).name for s in (self.env.work_in, self.env.work_out) if s]

    async def _declare_work(self) -> None:
        """Declare the hive exchange and the work queues; route work-out by its suffix."""
        assert self._bus is not None
        env = self.env
        if not (env.work_in or env.work_out):
            return
        hive = await self._bus.declare_exchange(self.topology.hive_exchange(env.swarm_id))
        if env.work_out:
            await self._bus.declare_queue(self.work_queue(env.work_out))
            # The work_queue template binds the queue to the hive exchange with the suffix as key.
            self.ctx._out = (hive.name, env.work_out)
        if env.work_in:
            self._work_in = self.work_queue(env.work_in)
            await self._bus.declare_queue(self._work_in)

    async def _sync_work_consumer(self) -> None:
        """Consume work-in only while enabled: retired on disable, started again on enable,
        and replaced when the worker asks for another prefetch."""
        if self._work_in is None or self._bus is None:
            return
        async with self._switch:
            current = self._work
            if current is not None and (not self.ctx.enabled or current.prefetch != self.worker.prefetch):
                self._work = None
                await self._retire(current)
            if self.ctx.enabled and self._work is None:
                work = WorkConsumer(max(1, self.worker.prefetch))
                work.consumer = await self._bus.consume(self._work_in, partial(self._on_work, work),
                                                        prefetch=work.prefetch)
                self._work = work

    async def _retire(self, work: WorkConsumer) -> None:
        """Stop deliveries to ``work`` at once; close its channel once the messages it has in
        hand are handled and acked (at most ``DRAIN_S`` later), so none is delivered twice."""
        consumer = work.consumer
        if consumer is None:
            return
        try:
            await consumer.queue.cancel(consumer.tag)
        except Exception as exc:  # the channel is gone: so are its deliveries
            self.log.warning("work consumer cancel was not clean", error=repr(exc))
        task = asyncio.create_task(self._close_when_idle(consumer, work))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _close_when_idle(self, consumer: Consumer, work: WorkConsumer) -> None:
        try:
            with suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_S):
                    await work.idle.wait()
                    await asyncio.sleep(0)  # let the last handler's ack go out first
        finally:
            if not consumer.channel.is_closed:
                with suppress(Exception):
                    await consumer.channel.close()

    # --- work -----------------------------------------------------------------------

    async def _on_work(self, work: WorkConsumer, _key: str, body: dict[str, Any],
                       _message: AbstractIncomingMessage) -> None:
        work.started()
        try:
            await self.worker.handle(self.ctx, body)
        except Exception:
            self.ctx.totals.errors += 1
            raise
        finally:
            work.finished()
        self.ctx.totals.processed += 1

    async def _produce(self) -> None:
        """Call the worker's ``tick`` while enabled, waking early on any change."""
        while True:
            if not self.ctx.enabled:
                await self._changed.wait()
                self._changed.clear()
                continue
            self._changed.clear()
            try:
                delay = await self.worker.tick(self.ctx)
            except Exception as exc:
                self.log.warning("producer step failed", error=repr(exc))
                delay = ERROR_BACKOFF_S
            if delay is None:
                await self._changed.wait()
            elif delay > 0:
                with suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
            else:
                await asyncio.sleep(0)

    # --- control signals ------------------------------------------------------------

    async def _status_request(self, sig: Signal) -> None:
        await self._publish_status("status-full", correlation_id=sig.correlation_id)

    async def _apply(self, sig: Signal) -> OutcomeState:
        """``config-update``: merge the patch, let the worker act on it, remember the result."""
        try:
            config, enabled = apply_patch(self.worker.Config, self.ctx.config, sig.args.get("patch"),
                                          self._validation)
        except ConfigRejected as exc:
            self.log.warning("config rejected", reason=exc.message)
            raise Failure("invalid-config", exc.message, "config-update", details={"errors": exc.errors},
                          state=self._state()) from None
        previous, self.ctx.config = self.ctx.config, config
        if enabled is not None:
            self.ctx.enabled = enabled
        failure: Exception | None = None
        try:
            await self.worker.on_config(self.ctx, previous)
        except Exception as exc:
            failure = exc
        await self._sync_work_consumer()
        self._changed.set()
        self._unsaved.add(sig.correlation_id)  # saved once its outcome is out (_after_command)
        if failure is not None:
            self.log.warning("config applied, worker failed to act on it", error=repr(failure))
            raise Failure("apply-failed", str(failure) or repr(failure), "config-update", retryable=True,
                          state=self._state())
        self.log.info("config applied", enabled=self.ctx.enabled)
        return self._state()

    # --- state kept across restarts ---------------------------------------------------

    async def _restore(self) -> None:
        """Take back the config and switch a previous container of this bee left."""
        assert self._bus is not None
        kept = await snapshot.load(self._bus, self.state_queue(), base=self._base)
        if kept is None:
            return
        try:
            config = parse_config(self.worker.Config, kept.config or {}, self._validation)
        except ConfigRejected as exc:  # the worker's rules changed since: start from the env
            self.log.warning("kept config no longer valid, starting from the environment", reason=exc.message)
            return
        self.ctx.config = config
        if kept.enabled is not None:
            self.ctx.enabled = kept.enabled
        self.log.info("state restored", enabled=self.ctx.enabled)

    async def _after_command(self, sig: Signal, _outcome: Outcome) -> None:
        """The outcome is out; the signal is acked once the state a restart must find is saved
        (a crash before that redelivers the signal, which applies the same patch again)."""
        if sig.correlation_id in self._unsaved:
            self._unsaved.discard(sig.correlation_id)
            await self._saver.request()

    async def _save_state(self) -> None:
        assert self._bus is not None
        await snapshot.save(self._bus, self.state_queue(), snapshot.Snapshot(
            enabled=self.ctx.enabled, config=self._config_json(), base=self._base))

    def _state(self) -> OutcomeState:
        return OutcomeState(status=self.ctx.state, enabled=self.ctx.enabled,
                            details={"config": self._reported_config()})

    def _reported_config(self) -> dict[str, Any]:
        """The config as statuses and outcomes show it, which everyone on ph.control reads."""
        return redact(self._config_json(), self.env.secret_keys)

    def _config_json(self) -> dict[str, Any]:
        return self.ctx.config.model_dump(mode="json", by_alias=True)

    # --- status ---------------------------------------------------------------------

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.env.status_interval_s)
            try:
                async with asyncio.timeout(self.env.status_interval_s):
                    await self._publish_status("status-delta")
            except Exception as exc:  # the broker may be away; the next interval tries again
                self.log.warning("status not published", error=repr(exc))

    async def _publish_status(self, kind: StatusKind, correlation_id: str | None = None,
                              state: str | None = None) -> None:
        assert self._bus is not None
        status = await self.status(kind, state)
        await self._bus.publish(status.routing_key(), status, correlation_id=correlation_id)

    async def status(self, kind: StatusKind, state: str | None = None) -> Status:
        """Build a status; a delta also starts the next interval the rates are measured over."""
        now, totals = self.ctx.now(), self.ctx.totals.snapshot()
        data = self._worker_report()
        data["rates"] = rates(self._last_totals, totals, now - self._last_at)
        if kind == "status-delta":
            self._last_at, self._last_totals = now, totals
        else:
            data |= {"config": self._reported_config(), "workIn": self.env.work_in, "workOut": self.env.work_out}
        return Status(kind=kind, role=self.env.role, instance=self.env.instance, swarm_id=self.env.swarm_id,
                      enabled=self.ctx.enabled, state=state or self.ctx.state, totals=totals.as_dict(),
                      queue_stats=await self._queue_stats(), data=data, ts=utcnow())

    def _worker_report(self) -> dict[str, Any]:
        """The worker's own status fields; a failing report must not cost the whole status."""
        try:
            return dict(self.worker.report(self.ctx))
        except Exception as exc:
            self.log.warning("worker report failed", error=repr(exc))
            return {}

    async def _queue_stats(self) -> dict[str, dict[str, float]]:
        """Depth and consumers of the work queues, from a passive declare on a short channel."""
        assert self._bus is not None
        stats: dict[str, dict[str, float]] = {}
        for name in self.work_queue_names():
            channel = await self._bus.connection.channel()
            try:
                # robust=False: a robust channel would cache the queue and report stale counts.
                queue = await channel.declare_queue(name, passive=True, robust=False)
                result = queue.declaration_result
                stats[name] = {"messages": float(result.message_count or 0),
                               "consumers": float(result.consumer_count or 0)}
            except Exception as exc:  # deleted under us; report what we can
                self.log.debug("queue stats unavailable", queue=name, error=repr(exc))
            finally:
                if not channel.is_closed:
                    await channel.close()
        return stats


# --- process entry point --------------------------------------------------------------


def run_bee(worker_factory: Callable[[], Worker[Any]]) -> None:
    """Run a bee process: read ``CP_*``, serve until SIGTERM or SIGINT, exit 0."""
    env = load_env_or_exit()
    configure(env.log_level, env.log_format)
    try:
        bee = Bee(env, worker_factory())
    except ConfigRejected as exc:
        raise SystemExit(f"CP_BEE_CONFIG: {exc}") from None
    asyncio.run(_serve(bee))


async def _serve(bee: Bee[Any]) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, bee.stop)
    await bee.run()
