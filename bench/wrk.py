"""Closed-loop HTTP load from wrk, a load client written in C, for a figure where the Python
client's own CPU would be the server's loss.

Client and server share the machine's two cores. ``bench.httpload`` (aiohttp on uvloop) costs
about 0.2 ms of CPU per request, a fifth of a core at 1,000 requests/s, which the gateway then
lacks; wrk costs a small part of that. A job's result has the keys of a ``bench.httpload``
result (``name``, ``n``, ``ok``, ``errors``, ``elapsed_s``, ``rps``, ``latency_ms``), so both
print alike. wrk runs for a time, not for a count of requests: ``n`` is how many it completed.

wrk comes from Debian's packages (``apt-get install wrk``); ``available()`` says whether it is here.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from typing import Any
from urllib.parse import urlsplit

from bench.common import BenchError

# One wrk thread drives every connection; each connection is one request in flight at a time.
# ``response`` counts the answers whose status is not the one expected (a thread's own state,
# read back in ``done`` through the threads ``setup`` kept).
SCRIPT = """
local paths = {%(paths)s}
local threads = {}
local i = 0
wrk.method = %(method)s
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"

function setup(thread) table.insert(threads, thread) end
function init(args) unexpected = 0 end
function request()
  i = i + 1
  return wrk.format(nil, paths[(i %% #paths) + 1])
end
function response(status, headers, body)
  if status ~= %(status)d then unexpected = unexpected + 1 end
end
function done(summary, latency, requests)
  local wrong = 0
  for _, thread in ipairs(threads) do wrong = wrong + thread:get("unexpected") end
  local failed = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    "RESULT {\\"n\\": %%d, \\"us\\": %%d, \\"unexpected\\": %%d, \\"failed\\": %%d, \\"p50\\": %%d, \\"p99\\": %%d, "
    .. "\\"mean\\": %%f, \\"max\\": %%d}\\n",
    summary.requests, summary.duration, wrong, failed, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII is a Lua string literal


async def load(name: str, method: str, urls: list[str], body: Any, concurrency: int, duration_s: float,
                   expect_status: int) -> dict[str, Any]:
    """``urls`` (one server) cycled through by ``concurrency`` connections for ``duration_s``."""
    origin = urlsplit(urls[0])
    base = f"{origin.scheme}://{origin.netloc}"
    paths = [urlsplit(url).path for url in urls]
    if any(not url.startswith(base) for url in urls):
        raise BenchError("wrk_load: every URL must be on one server")
    script = SCRIPT % {"paths": ",".join(_lua(p) for p in paths), "method": _lua(method),
                       "body": _lua(json.dumps(body)), "status": expect_status}
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as file:
        file.write(script)
        file.flush()
        proc = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{concurrency}", f"-d{duration_s:g}s", "-s", file.name, base,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({proc.returncode}): {(err or out).decode()[-2000:]}")
    raw = json.loads(lines[0].removeprefix("RESULT "))
    elapsed = raw["us"] / 1e6
    errors = raw["unexpected"] + raw["failed"]
    return {"name": name, "n": raw["n"], "ok": raw["n"] - raw["unexpected"], "errors": errors,
            "first_errors": [f"{raw['unexpected']} answers not {expect_status}, {raw['failed']} failed"] if errors
            else [], "elapsed_s": elapsed, "rps": raw["n"] / elapsed, "client": "wrk",
            "latency_ms": {"p50": raw["p50"] / 1000, "p99": raw["p99"] / 1000, "mean": raw["mean"] / 1000,
                           "max": raw["max"] / 1000}}

