"""Containers' stats readings from the engine's HTTP API, asked asynchronously.

The engine answers a one-shot reading at its stats collector's next tick, about a second
later, whatever the machine is doing: a reading is mostly waiting. Asked through the SDK, each
would hold one of the runtime's worker threads (``CP_DOCKER_WORKERS``) for that second, and
200 of them would keep every other engine call waiting. Here they are plain aiohttp requests
on the engine's socket, many side by side for the cost of one connection each.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from yarl import URL

from controlplane.runtime.errors import ContainerRuntimeError, RuntimeUnavailable


class StatsReader:
    def __init__(self, docker_url: str, timeout_s: float = 30.0) -> None:
        url = URL(docker_url)
        if url.scheme == "unix":
            self._connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=url.path)
            self._base = URL("http://docker")
        elif url.scheme in ("tcp", "http"):
            self._connector = aiohttp.TCPConnector()
            self._base = URL.build(scheme="http", host=url.host or "127.0.0.1", port=url.port)
        else:
            raise ValueError(f"stats are read over unix:// or tcp:// engines, not {docker_url!r}")
        self._session = aiohttp.ClientSession(connector=self._connector,
                                              timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def read(self, container_id: str) -> dict[str, Any] | None:
        """One reading (``precpu_stats`` empty); None when the container is gone."""
        url = self._base / "containers" / container_id / "stats"
        try:
            async with self._session.get(url, params={"stream": "false", "one-shot": "true"}) as resp:
                if resp.status == 404:
                    return None
                if resp.status >= 400:
                    raise ContainerRuntimeError(f"stats of {container_id[:12]}: {resp.status} {await resp.text()}")
                body: dict[str, Any] = await resp.json(content_type=None)
                return body
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise RuntimeUnavailable(f"stats of {container_id[:12]}: the engine does not answer: {exc}") from exc

    async def close(self) -> None:
        await self._session.close()
