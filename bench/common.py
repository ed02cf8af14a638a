"""What every benchmark shares: the machine it ran on, progress lines, the main-function tail."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from controlplane import logs

REPO_ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("CP_TEST_BROKER", "127.0.0.1:5672")
MANAGEMENT = os.environ.get("CP_TEST_MANAGEMENT", "http://127.0.0.1:15672")


class BenchError(RuntimeError):
    pass


def ms(seconds: float) -> float:
    return seconds * 1000


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def environment(broker: str, **more: str) -> dict[str, Any]:
    """The machine, the code and the versions a run measured, printed with its figures."""
    return {"date": date.today().isoformat(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg_1m": os.getloadavg()[0], "code": code_version(), "os": os_name(), "broker": broker,
            "aio_pika": aio_pika.__version__, "aiohttp": aiohttp.__version__, **more}


def code_version() -> str:
    """The commit measured, and whether the code (not bench/ or docs/) differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench", ":!docs"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + local changes' if dirty else ''}"


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def run_and_print(args: argparse.Namespace, run: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
                  render: Callable[[dict[str, Any], argparse.Namespace], str]) -> None:
    """Run a benchmark, print its table, and write the raw figures to ``--json`` if given."""
    logs.configure("WARNING")  # warnings to stderr; stdout keeps the table
    results = asyncio.run(run(args))
    print(render(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
