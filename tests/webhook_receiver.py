"""An HTTP endpoint on 127.0.0.1 that keeps every webhook call it receives, for the tests of
webhooks and of the services that emit them."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that keeps every request, answering each with the next
    status of ``answers`` (200 once they run out)."""

    def __init__(self, port: int, answers: list[int] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.answers = list(answers or [])
        self.seen: list[Received] = []
        self._arrived = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        received = Received({k.lower(): v for k, v in request.headers.items()}, await request.read())
        status = self.answers.pop(0) if self.answers else 200
        async with self._arrived:
            self.seen.append(received)
            self._arrived.notify_all()
        return web.Response(status=status, text="ok" if status < 300 else "not now")

    async def wait_for(self, where: Callable[[list[Received]], bool], timeout: float = WAIT_S) -> list[Received]:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: where(self.seen)), timeout)
            return list(self.seen)

    def events(self) -> list[str]:
        return [r.json["data"]["eventId"] for r in self.seen]


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()


