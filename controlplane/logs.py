"""structlog set-up: console lines for people, JSON lines in production.

Context such as ``correlation_id`` and ``request_id`` is bound with contextvars so every
line logged while handling one request or one message carries it. Secrets are masked by a
processor, so a URL with a password never reaches a log in the clear.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

from controlplane.contract.redact import safe_text

_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")
_SECRET_FIELDS = {"api_key", "password", "secret", "authorization", "token"}


def mask_url(url: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", url)


def _mask_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event.items()):
        if key.lower() in _SECRET_FIELDS and value is not None:
            event[key] = "***"
        elif isinstance(value, str) and "://" in value:
            event[key] = mask_url(value)
    return event


def _printable(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Console lines only: a value from the broker or a container must not forge a line or
    move the terminal's cursor (JSON lines escape control characters themselves)."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = safe_text(value, limit=4000)
    return event


def configure(level: str = "INFO", fmt: str = "console") -> None:
    json_lines = fmt == "json"
    renderer: Any = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(message)s")
    for noisy in ("aiormq", "aio_pika", "urllib3", "docker", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            structlog.processors.format_exc_info,
            *([] if json_lines else [_printable]),
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
