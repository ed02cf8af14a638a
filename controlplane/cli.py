"""The ``controlplane`` command: run the processes, follow events, export the topology.

  controlplane up                  gateway + host controller (+ in-process swarm-controllers)
  controlplane gateway             the REST gateway alone
  controlplane host-controller     the host controller alone
  controlplane swarm-controller ID one swarm's controller (what the host launches in a container)
  controlplane watch PATTERN       print events from ph.control matching a topic pattern
                                   (over AMQP, or with --url through the gateway's SSE stream)
  controlplane topology export     RabbitMQ definitions for the management UI
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aio_pika
import aiohttp
import click
from pydantic import SecretStr
from aiohttp import web

from controlplane import logs
from controlplane.bus import Bus
from controlplane.bus.accounts import BrokerAccounts, ensure_process_users, stream_publisher_grant
from controlplane.bus.management import ManagementError
from controlplane.config import Settings, load_settings_or_exit
from controlplane.contract import keys
from controlplane.contract.models import Signal, SwarmPlan
from controlplane.contract.topology import definitions, load_topology
from controlplane.controller.host import HostController
from controlplane.controller.swarm import SwarmController, plan_from_labels
from controlplane.gateway.app import open_gateway
from controlplane.gateway.events import KEEPALIVE_S
from controlplane.runtime.docker import DockerRuntime
from controlplane.scenarios import PoolConfigError, configured_pool, load_catalog

log = logs.get_logger("cli")


def _settings() -> Settings:
    settings = load_settings_or_exit()
    logs.configure(settings.log_level, settings.log_format)
    try:
        configured_pool(settings, load_catalog(settings.scenarios_dir))
    except PoolConfigError as exc:
        raise SystemExit(f"invalid configuration:\n  {exc}") from None
    return settings


def _gateway_settings() -> Settings:
    """Settings of a process that serves the API: refused when it would listen unprotected."""
    settings = _settings()
    problem = settings.exposure_problem()
    if problem:
        raise SystemExit(f"refusing to start: {problem}")
    return settings


def _run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main`` until SIGINT/SIGTERM sets its stop event."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


async def _open_bus(stack: AsyncExitStack, settings: Settings, name: str, declare_exchanges: bool = True) -> Bus:
    bus = Bus(settings.amqp_url.get_secret_value(), load_topology(settings.topology_file), name)
    await bus.connect(declare_exchanges=declare_exchanges)
    stack.push_async_callback(bus.close)
    return bus


async def _open_runtime(stack: AsyncExitStack, settings: Settings) -> DockerRuntime:
    runtime = DockerRuntime.from_settings(settings)
    stack.push_async_callback(runtime.close)
    await runtime.ping()
    return runtime


async def _as_own_users(settings: Settings) -> tuple[Settings, Settings]:
    """Gateway and host controller settings, each with a broker user of its own (made from
    CP_AMQP_URL's administrator); the URL as given when users are off or cannot be made."""
    accounts = BrokerAccounts.from_settings(settings)
    if accounts is None:
        return settings, settings
    try:
        gateway_url, host_url = await ensure_process_users(accounts, settings)
    except ManagementError as exc:
        log.warning("running with CP_AMQP_URL as given: the broker users could not be made", error=repr(exc))
        return settings, settings
    pinned = accounts.as_settings()  # the containers' users keep the passwords the administrator derives
    return (settings.model_copy(update={"amqp_url": SecretStr(gateway_url), **pinned}),
            settings.model_copy(update={"amqp_url": SecretStr(host_url), **pinned}))


async def _start_host(stack: AsyncExitStack, settings: Settings, bus: Bus) -> None:
    host = await HostController(bus, await _open_runtime(stack, settings), settings).start()
    stack.push_async_callback(host.stop)


async def _serve_gateway(stack: AsyncExitStack, settings: Settings, bus: Bus) -> None:
    app = await stack.enter_async_context(open_gateway(settings, bus))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, settings.host, settings.port).start()
    # What start-up made lives as long as the process: moved out of the collector's reach, so a
    # full collection no longer walks it (they stalled the loop ~100 ms under large requests).
    gc.freeze()


@click.group()
def main() -> None:
    """Event-driven control plane: REST in, RabbitMQ signals, Docker containers out."""


@main.command()
def up() -> None:
    """Run gateway and host controller in one process."""
    settings = _gateway_settings()

    async def run(stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            gateway_settings, host_settings = await _as_own_users(settings)
            await _serve_gateway(stack, gateway_settings,
                                 await _open_bus(stack, gateway_settings, f"gateway.{settings.gateway_name}"))
            await _start_host(stack, host_settings,
                              await _open_bus(stack, host_settings, f"host-controller.{settings.instance_id}"))
            base = f"http://{settings.host}:{settings.port}"
            pool = f"  engine pool:   {base}{settings.ace_prefix} (engines: {settings.ace_image})\n" \
                if settings.ace_pool_id else ""
            click.echo(f"controlplane is up\n  API:           {base}/api\n{pool}  health:        {base}/readyz\n"
                       f"  management UI: {settings.management_url} (guest/guest from this machine)", err=True)
            await stop.wait()

    _run(run)


@main.command()
def gateway() -> None:
    """Run the REST gateway alone."""
    settings = _gateway_settings()

    async def run(stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            await _serve_gateway(stack, settings, await _open_bus(stack, settings, f"gateway.{settings.instance_id}"))
            log.info("gateway listening", host=settings.host, port=settings.port)
            await stop.wait()

    _run(run)


@main.command("host-controller")
def host_controller() -> None:
    """Run the host controller alone (swarm-controllers per CP_CONTROLLER_MODE)."""
    settings = _settings()

    async def run(stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            await _start_host(stack, settings, await _open_bus(stack, settings, f"host-controller.{settings.instance_id}"))
            log.info("host controller running", mode=settings.controller_mode)
            await stop.wait()

    _run(run)


@main.command("swarm-controller")
@click.argument("swarm_id")
def swarm_controller(swarm_id: str) -> None:
    """Run one swarm's controller; the plan comes from its bees' labels or CP_SWARM_PLAN."""
    settings = _settings()

    async def run(stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            # A broker user of its own, which may not configure the shared exchanges.
            bus = await _open_bus(stack, settings, f"swarm-controller.{swarm_id}", declare_exchanges=False)
            runtime = await _open_runtime(stack, settings)
            # Bees already running win over the launch plan: a template applied later changed them.
            plan = await plan_from_labels(runtime, settings.instance_id, swarm_id)
            if plan is None:
                plan = SwarmPlan.model_validate_json(os.environ["CP_SWARM_PLAN"])
            raw_signal = os.environ.get("CP_CREATE_SIGNAL")
            create = Signal.model_validate_json(raw_signal) if raw_signal else None
            controller = SwarmController(bus, runtime, settings, swarm_id, plan, settings.instance_id, create)
            task = asyncio.create_task(controller.run())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in (task, stopper):
                t.cancel()
            await asyncio.gather(task, stopper, return_exceptions=True)

    _run(run)


@main.command("broker-users")
@click.option("--stream-publisher", "publishers", multiple=True, metavar="NAME",
              help="Also make a stream publisher's user (repeatable); NAME: lowercase letters, digits and '-'.")
def broker_users(publishers: tuple[str, ...]) -> None:
    """Make the gateway's and the host controller's own broker users; print their CP_AMQP_URL.

    Run once with an administrator's CP_AMQP_URL; then start each process with its own URL.
    The gateway's user may declare the shared topology and its own queues and publish commands,
    nothing else; the host controller's is an administrator, since it makes the users of the
    containers it launches. A stream publisher's user may only listen for stream requests and
    answer them. Passwords are derived from CP_BROKER_USER_SECRET: set it, so that the host
    controller keeps deriving the same ones once it runs as its own user.
    """
    settings = _settings()
    for name in publishers:
        problem = keys.slug_problem(name)
        if problem:
            raise click.BadParameter(f"{name!r} {problem}", param_hint="--stream-publisher")

    async def run(_stop: asyncio.Event) -> None:
        accounts = BrokerAccounts.from_settings(settings.model_copy(update={"broker_users": True}))
        assert accounts is not None
        gateway_url, host_url = await ensure_process_users(accounts, settings)
        click.echo(f"gateway          CP_AMQP_URL={gateway_url}")
        click.echo(f"host-controller  CP_AMQP_URL={host_url}")
        for name in publishers:
            url = await accounts.ensure("stream-publisher", name, stream_publisher_grant(),
                                        base=settings.amqp_url.get_secret_value())
            click.echo(f"stream-publisher {name} AMQP_URL={url}")

    _run(run)


@main.command()
@click.argument("pattern", default="#")
@click.option("--count", type=int, default=0, help="Exit after this many events (0: run until interrupted).")
@click.option("--url", default=None, metavar="URL",
              help="Watch through the gateway's event stream at URL (e.g. http://127.0.0.1:8080) instead of AMQP.")
@click.option("--api-key", envvar="CP_API_KEY", default=None, help="Bearer key, when the gateway protects reads.")
def watch(pattern: str, count: int, url: str | None, api_key: str | None) -> None:
    """Print events on ph.control whose routing key matches PATTERN (AMQP topic syntax).

    PATTERN may list several patterns separated by commas with --url. Each event is one JSON
    line: {"routingKey": ..., "body": ...}.
    """
    if url is not None:
        _run(lambda stop: _watch_gateway(url, pattern, count, api_key, stop))
        return
    settings = load_settings_or_exit()

    async def run(stop: asyncio.Event) -> None:
        connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value(),
                                                   client_properties={"connection_name": "controlplane watch"})
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.bind(keys.CONTROL_EXCHANGE, routing_key=pattern)
            seen = 0
            done = asyncio.Event()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal seen
                try:
                    body = json.loads(message.body)
                except ValueError:
                    body = message.body.decode(errors="replace")
                _print_event(message.routing_key or "", body)
                seen += 1
                if count and seen >= count:
                    done.set()

            await queue.consume(on_message, no_ack=True)
            click.echo(f"watching {pattern!r} on {keys.CONTROL_EXCHANGE}", err=True)
            await _until_first(stop, done)

    _run(run)


def _print_event(routing_key: str, body: object) -> None:
    click.echo(json.dumps({"routingKey": routing_key, "body": body}))
    sys.stdout.flush()


async def _until_first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()


class _GatewayRefused(Exception):
    """The gateway answered with an error no retry can fix (bad pattern, missing key)."""


async def _watch_gateway(url: str, pattern: str, count: int, api_key: str | None, stop: asyncio.Event) -> None:
    """Follow ``GET /api/events`` until interrupted or ``count`` events were printed."""
    follow = asyncio.create_task(_follow_stream(url, pattern, count, api_key))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({follow, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for task in (follow, stopper):
        task.cancel()
    outcome, _ = await asyncio.gather(follow, stopper, return_exceptions=True)
    if isinstance(outcome, _GatewayRefused):
        raise click.ClickException(str(outcome))


async def _follow_stream(url: str, pattern: str, count: int, api_key: str | None) -> None:
    """Print the stream's events; reconnect with Last-Event-ID when it ends (gateway restart,
    or this client fell behind), as a browser's EventSource does."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/api/events"
    last_id: str | None = None
    seen, delay, announced = 0, 0.5, False
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=3 * KEEPALIVE_S)
    # Lines up to 1 MiB: a status event with large data is still one SSE line.
    async with aiohttp.ClientSession(timeout=timeout, read_bufsize=1 << 20) as session:
        while True:
            request_headers = {**headers, **({"Last-Event-ID": last_id} if last_id else {})}
            try:
                async with session.get(endpoint, params={"topics": pattern}, headers=request_headers) as resp:
                    if 400 <= resp.status < 500:
                        raise _GatewayRefused(f"{resp.status}: {await resp.text()}")
                    resp.raise_for_status()
                    if not announced:
                        click.echo(f"watching {pattern!r} on {endpoint}", err=True)
                        announced = True
                    delay = 0.5
                    async for frame in _sse_frames(resp.content):
                        if frame.event == "gap":
                            click.echo(f"events were missed; the stream resumes at {frame.data}", err=True)
                            continue
                        if frame.id is not None:
                            last_id = frame.id
                        event = json.loads(frame.data)
                        _print_event(event["routingKey"], event["body"])
                        seen += 1
                        if count and seen >= count:
                            return
                click.echo("event stream ended; reconnecting", err=True)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                click.echo(f"event stream interrupted ({exc or type(exc).__name__}); retrying in {delay:.1f}s",
                           err=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


@dataclass
class _Frame:
    id: str | None = None
    event: str = "message"
    data: str = ""


async def _sse_frames(content: aiohttp.StreamReader) -> AsyncIterator[_Frame]:
    """Server-Sent Events frames from a response body; comments (keep-alives) are skipped."""
    frame, data = _Frame(), []
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                frame.data = "\n".join(data)
                yield frame
            frame, data = _Frame(), []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            frame.event = value
        elif name == "id":
            frame.id = value


@main.group()
def topology() -> None:
    """Inspect the RabbitMQ topology."""


@topology.command("export")
def topology_export() -> None:
    """Print the static topology as a RabbitMQ definitions file (import it in the management UI)."""
    settings = load_settings_or_exit()
    click.echo(json.dumps(definitions(load_topology(settings.topology_file)), indent=2))


if __name__ == "__main__":
    main()
