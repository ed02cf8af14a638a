"""Ids callers send, each kind with its own check, so a bad one is a 400 that says why.

A *slug* becomes a routing-key segment or a container name (``keys.slug_problem``); a *swarm*
id is a slug without ``--``, which joins it to a bee name in an instance id. The other
surfaces' documents use ids of their own: UUIDs (streams, sessions, webhooks) and Docker
container references (a full 64-hex id, a unique prefix of at least 12 hex digits, or a
container name). Those never become key segments as they are.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator

from controlplane.contract import keys

IdKind = Literal["slug", "swarm", "uuid", "container"]

_CONTAINER_ID = re.compile(r"^[0-9a-f]{12,64}$")
# Docker's own rule for container names.
_CONTAINER_NAME = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


def problem(kind: IdKind, value: str) -> str | None:
    """Why ``value`` is not a valid id of ``kind``, or None when it is."""
    if kind == "slug":
        return keys.slug_problem(value)
    if kind == "swarm":
        return keys.part_problem(value)
    if kind == "uuid":
        try:
            uuid.UUID(value)
        except ValueError:
            return "must be a UUID, e.g. 550e8400-e29b-41d4-a716-446655440000"
        return None
    if _CONTAINER_ID.match(value) or _CONTAINER_NAME.match(value):
        return None
    return "must be a container id (12 to 64 hex digits) or a container name"


def _checked(kind: IdKind):  # type: ignore[no-untyped-def]
    def check(value: str) -> str:
        why = problem(kind, value)
        if why:
            raise ValueError(why)
        return value

    return AfterValidator(check)


Slug = Annotated[str, _checked("slug")]
Uuid = Annotated[str, _checked("uuid")]
ContainerRef = Annotated[str, _checked("container")]
