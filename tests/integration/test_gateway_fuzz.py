"""Schemathesis drives every documented operation of a real gateway process with generated
input, valid and invalid: whatever arrives, the answer is never a server error."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import BROKER, fresh_vhost

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
async def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    # A vhost of its own: the creates it accepts must never reach another test's host controller.
    async with fresh_vhost() as vhost:
        port = _free_port()
        env = {**os.environ, "CP_AMQP_URL": f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}",
               "CP_DATABASE_URL": f"sqlite:///{Path(tmp_path_factory.mktemp('fuzz')) / 'cp.db'}",
               "CP_PORT": str(port), "CP_LOG_LEVEL": "ERROR", "CP_CONFLICT_SETTLE_MS": "0"}
        proc = subprocess.Popen([sys.executable, "-m", "controlplane.cli", "gateway"], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    try:
                        async with http.get(f"{url}/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


@schemathesis.check
def no_unexplained_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except a 503 or 504 the operation documents, whose body names the cause and says
    it is worth retrying (the engine pool has no controller behind this lone gateway)."""
    if response.status_code in (503, 504):
        body = response.json()
        documented = str(response.status_code) in case.operation.definition.raw.get("responses", {})
        explained = bool(body.get("error") and body.get("message") and (body.get("retryable") or body.get("operationId")))
        assert documented and explained, f"{response.status_code} without a documented cause: {body}"
        return None
    return not_a_server_error(ctx, response, case)


def test_no_input_makes_the_gateway_fail(gateway_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, "every documented operation is exercised"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exercise(case: Any) -> None:
            case.call_and_validate(base_url=gateway_url, checks=[no_unexplained_server_error])

        exercise()
