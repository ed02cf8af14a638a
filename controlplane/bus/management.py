"""A small client of RabbitMQ's management HTTP API.

What an operator reads in the management UI, read by code: queue depths, connections,
vhosts. The controllers use it to give each component a broker user of its own; tests and
benchmarks use it to isolate themselves in a vhost of their own and to cut a client's
connection the way a broker restart would.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp


class ManagementError(RuntimeError):
    """The management API refused a request, or could not be reached in time."""

# A call that takes longer is a broker in trouble: callers act on the error rather than hang.
CALL_TIMEOUT_S = 10.0


class Management:
    def __init__(self, url: str = "http://127.0.0.1:15672", user: str = "guest", password: str = "guest") -> None:
        self._url = url.rstrip("/")
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Management:
        self._http = aiohttp.ClientSession(self._url, headers={"Authorization": self._auth},
                                           timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        assert self._http is not None, "use Management as an async context manager"
        try:
            async with self._http.request(method, f"/api{path}", **kwargs) as resp:
                if resp.status == 404 and 404 in ok:
                    return None
                if resp.status not in ok:
                    raise ManagementError(f"{method} {path}: {resp.status} {await resp.text()}")
                return await resp.json() if resp.content_type == "application/json" else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ManagementError(f"{method} {path}: the management API at {self._url} did not answer: {exc!r}") from exc

    async def overview(self) -> dict[str, Any]:
        return await self._call("GET", "/overview")

    async def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """A queue's details (``messages``, ``consumers``, ``message_stats``), None if absent."""
        return await self._call("GET", f"/queues/{quote(vhost, safe='')}/{quote(name, safe='')}", ok=(200, 404))

    async def connections(self) -> list[dict[str, Any]]:
        """Every client connection (``user``, ``vhost``, ``client_properties``…)."""
        return await self._call("GET", "/connections")

    async def connections_named(self, connection_name: str) -> list[str]:
        """Broker-side names of the connections a client opened under ``connection_name``."""
        found = await self._call("GET", "/connections")
        return [c["name"] for c in found if c.get("client_properties", {}).get("connection_name") == connection_name]

    async def close_connection(self, name: str, reason: str = "closed by an operator") -> None:
        await self._call("DELETE", f"/connections/{quote(name, safe='')}", ok=(200, 204, 404),
                         headers={"X-Reason": reason})

    async def put_user(self, name: str, password: str, tags: str = "") -> None:
        await self._call("PUT", f"/users/{quote(name, safe='')}", ok=(201, 204),
                         json={"password": password, "tags": tags})

    async def delete_user(self, name: str) -> None:
        await self._call("DELETE", f"/users/{quote(name, safe='')}", ok=(204, 404))

    async def users(self) -> list[str]:
        return [u["name"] for u in await self._call("GET", "/users")]

    async def set_permissions(self, vhost: str, user: str, configure: str, write: str, read: str) -> None:
        await self._call("PUT", f"/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}", ok=(201, 204),
                         json={"configure": configure, "write": write, "read": read})

    async def set_topic_permissions(self, vhost: str, user: str, exchange: str, write: str, read: str) -> None:
        await self._call("PUT", f"/topic-permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
                         ok=(201, 204), json={"exchange": exchange, "write": write, "read": read})

    async def put_policy(self, vhost: str, name: str, pattern: str, definition: dict[str, Any], priority: int = 0,
                         apply_to: str = "queues") -> None:
        await self._call("PUT", f"/policies/{quote(vhost, safe='')}/{quote(name, safe='')}", ok=(201, 204),
                         json={"pattern": pattern, "definition": definition, "priority": priority,
                               "apply-to": apply_to})

    @asynccontextmanager
    async def scratch_vhost(self, prefix: str = "cp-scratch", user: str = "guest") -> AsyncIterator[str]:
        """A new vhost ``user`` may do everything in, deleted with its contents afterwards."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        path = quote(name, safe="")
        await self._call("PUT", f"/vhosts/{path}", ok=(201, 204))
        try:
            await self._call("PUT", f"/permissions/{path}/{quote(user, safe='')}", ok=(201, 204),
                             json={"configure": ".*", "write": ".*", "read": ".*"})
            yield name
        finally:
            await self._call("DELETE", f"/vhosts/{path}", ok=(204, 404))
