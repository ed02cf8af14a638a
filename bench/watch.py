"""An AMQP watcher on ``ph.control`` in a process of its own, run by ``bench.lifecycle``.

It stamps every message with ``time.perf_counter()`` the moment aio-pika hands it over and
writes one JSON line per message to stdout. On Linux ``perf_counter`` reads CLOCK_MONOTONIC,
which all processes share, so the parent can subtract its own timestamps from these. Keeping
the watcher out of the control plane's process means a busy event loop there cannot delay
the stamps, and it watches the way a caller would: from outside.

Usage: ``python -m bench.watch AMQP_URL PATTERN...``; prints ``{"ready": true}`` once bound.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aio_pika

EXCHANGE = "ph.control"
FORWARDED = ("correlationId", "signal", "result", "code", "message")


async def main(url: str, patterns: list[str]) -> None:
    connection = await aio_pika.connect(url, client_properties={"connection_name": "bench-watcher"})
    out = sys.stdout

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrived = time.perf_counter()
        try:
            body = json.loads(message.body)
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        slim = {k: body[k] for k in FORWARDED if k in body}
        out.write(json.dumps({"t": arrived, "key": message.routing_key or "", "body": slim}) + "\n")
        out.flush()

    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, type="topic", durable=True)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for pattern in patterns:
            await queue.bind(exchange, routing_key=pattern)
        await queue.consume(on_message, no_ack=True)
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        # Runs until the parent closes stdin (or goes away).
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
