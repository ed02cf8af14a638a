"""Secrets out of everything that is read or reported; untrusted text made safe to show.

One rule for the whole project, applied where a value leaves for readers: bees and
controllers redact their statuses and outcomes (which every watcher of ``ph.control``
sees), and the gateway redacts its views again, so an older component cannot leak through it.
The real values stay where they are needed: in signals to the component and its own
state snapshot.

A value is secret when it sits under ``env`` or ``headers`` (every value of those maps), when
its key names a secret (``password``, ``token``, ``apiKey``, ``authorization``…), or when its
key is one a plan lists in a bee's ``secrets``.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

MASK = "***"
# Maps whose every value is secret: a container's environment, an HTTP request's headers.
SECRET_MAPS = frozenset({"env", "headers"})
_SECRET_KEY = re.compile(r"pass(word|wd|phrase)?$|secret|token|api[-_]?key|authori[sz]ation|credential|cookie"
                         r"|private[-_]?key", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact(value: Any, secret_keys: Collection[str] = ()) -> Any:
    """A copy of ``value`` (JSON-like) with every secret replaced by ``***``; keys are kept,
    so a reader still sees which headers or variables are set. ``secret_keys``: more key
    names whose values are secret (a bee's ``secrets`` in its plan)."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = str(key)
            if name in SECRET_MAPS and isinstance(item, dict):
                out[key] = {k: MASK for k in item}
            elif (name in secret_keys or is_secret_key(name)) and item not in (None, "", {}, []):
                out[key] = MASK
            else:
                out[key] = redact(item, secret_keys)
        return out
    if isinstance(value, list):
        return [redact(item, secret_keys) for item in value]
    return value


def safe_text(text: str, limit: int = 800) -> str:
    """Untrusted text (a container's log tail, a value from the broker) fit for a console or
    a JSON reader: control characters replaced, the end kept when it is too long."""
    cleaned = _CONTROL.sub("\N{REPLACEMENT CHARACTER}", text.replace("\r\n", "\n"))
    return cleaned if len(cleaned) <= limit else "…" + cleaned[-(limit - 1):]
