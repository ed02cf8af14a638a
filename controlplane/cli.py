"""The ``controlplane`` command: run the processes, follow events, export the topology.

  controlplane up                  gateway + host controller (+ in-process swarm-controllers)
  controlplane gateway             the REST gateway alone
  controlplane host-controller     the host controller alone
  controlplane swarm-controller ID one swarm's controller (what the host launches in a container)
  controlplane watch PATTERN       print events from ph.control matching a topic pattern
  controlplane topology export     RabbitMQ definitions for the management UI
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import aio_pika
import click
from aiohttp import web

from controlplane import logs
from controlplane.bus import Bus
from controlplane.config import Settings, load_settings_or_exit
from controlplane.contract import keys
from controlplane.contract.models import Signal, SwarmPlan
from controlplane.contract.topology import definitions, load_topology
from controlplane.controller.host import HostController
from controlplane.controller.swarm import SwarmController, plan_from_labels
from controlplane.gateway.app import open_gateway
from controlplane.runtime.docker import DockerRuntime

log = logs.get_logger("cli")


def _settings() -> Settings:
    settings = load_settings_or_exit()
    logs.configure(settings.log_level, settings.log_format)
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


async def _open_bus(stack: AsyncExitStack, settings: Settings, name: str) -> Bus:
    bus = await Bus(settings.amqp_url.get_secret_value(), load_topology(settings.topology_file), name).connect()
    stack.push_async_callback(bus.close)
    return bus


async def _open_runtime(stack: AsyncExitStack, settings: Settings) -> DockerRuntime:
    runtime = DockerRuntime.from_settings(settings)
    stack.push_async_callback(runtime.close)
    await runtime.ping()
    return runtime


async def _start_host(stack: AsyncExitStack, settings: Settings, bus: Bus) -> None:
    host = await HostController(bus, await _open_runtime(stack, settings), settings).start()
    stack.push_async_callback(host.stop)


async def _serve_gateway(stack: AsyncExitStack, settings: Settings, bus: Bus) -> None:
    app = await stack.enter_async_context(open_gateway(settings, bus))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, settings.host, settings.port).start()


@click.group()
def main() -> None:
    """Event-driven control plane: REST in, RabbitMQ signals, Docker containers out."""


@main.command()
def up() -> None:
    """Run gateway and host controller in one process."""
    settings = _settings()

    async def run(stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            bus = await _open_bus(stack, settings, f"controlplane-up.{settings.instance_id}")
            await _serve_gateway(stack, settings, bus)
            await _start_host(stack, settings, bus)
            base = f"http://{settings.host}:{settings.port}"
            click.echo(f"controlplane is up\n  API:           {base}/api\n  health:        {base}/readyz\n"
                       f"  management UI: {settings.management_url} (guest/guest from this machine)", err=True)
            await stop.wait()

    _run(run)


@main.command()
def gateway() -> None:
    """Run the REST gateway alone."""
    settings = _settings()

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
            bus = await _open_bus(stack, settings, f"swarm-controller.{swarm_id}")
            runtime = await _open_runtime(stack, settings)
            # Bees already running win over the launch plan: a template applied later changed them.
            plan = await plan_from_labels(runtime, swarm_id)
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


@main.command()
@click.argument("pattern", default="#")
@click.option("--count", type=int, default=0, help="Exit after this many events (0: run until interrupted).")
def watch(pattern: str, count: int) -> None:
    """Print events on ph.control whose routing key matches PATTERN (AMQP topic syntax)."""
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
                click.echo(json.dumps({"routingKey": message.routing_key, "body": body}), nl=True)
                sys.stdout.flush()
                seen += 1
                if count and seen >= count:
                    done.set()

            await queue.consume(on_message, no_ack=True)
            click.echo(f"watching {pattern!r} on {keys.CONTROL_EXCHANGE}", err=True)
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(done.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()

    _run(run)


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
