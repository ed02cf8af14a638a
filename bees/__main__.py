"""``python -m bees ROLE``: run the bee of that role (default: ``CP_ROLE``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any

from bees.sdk import Worker, run_bee

# role -> "module:class"; roles not listed here run with ``python -m <module>``.
WORKERS = {
    "generator": "bees.generator:Generator",
    "moderator": "bees.moderator:Moderator",
    "processor": "bees.processor:Processor",
    "postprocessor": "bees.postprocessor:Postprocessor",
    "trigger": "bees.trigger:Trigger",
}


def worker_factory(role: str) -> Callable[[], Worker[Any]]:
    try:
        module, _, name = WORKERS[role].partition(":")
    except KeyError:
        raise SystemExit(f"unknown bee role {role!r}; known: {', '.join(sorted(WORKERS))}") from None
    return getattr(import_module(module), name)


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CP_ROLE", "")
    run_bee(worker_factory(role))


if __name__ == "__main__":
    main()
