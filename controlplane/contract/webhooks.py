"""The services surface's webhooks on the wire: a registration, how a webhook and a delivery
are shown, and the events a webhook may subscribe to.

A registration carries a secret, the key every delivery is signed with (Standard Webhooks:
HMAC-SHA256 over ``<webhook-id>.<webhook-timestamp>.<body>``). The secret is kept to sign
and never shown again: a webhook's view says only that one is set.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import Field, field_validator
from yarl import URL

from controlplane.contract.base import Strict, Wire

ServiceEvent = Literal["service:start", "service:stop", "service:restart", "service:update", "service:error"]
SERVICE_EVENTS: tuple[str, ...] = get_args(ServiceEvent)
DeliveryStatus = Literal["pending", "delivered", "failed"]
DELIVERY_STATUSES: tuple[str, ...] = get_args(DeliveryStatus)

MAX_URL_LENGTH = 2048
MIN_SECRET_LENGTH = 8
MAX_SECRET_LENGTH = 256
# The Standard Webhooks form of a secret: this prefix, then the key's bytes in base64.
WHSEC_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key a secret stands for: a ``whsec_`` secret's base64 bytes, any other
    secret's UTF-8 bytes (so a receiver may verify with either form of its library)."""
    if secret.startswith(WHSEC_PREFIX):
        # Strict decoding: a lenient one drops stray characters and would sign with another key.
        encoded = secret[len(WHSEC_PREFIX):]
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    return secret.encode()


class WebhookCreate(Strict):
    """``POST /api/webhooks``."""

    url: str = Field(max_length=MAX_URL_LENGTH, description="http:// or https://; delivered to by POST")
    events: list[ServiceEvent] = Field(min_length=1, max_length=len(SERVICE_EVENTS))
    # Out of the model's repr, so a log line of the model cannot carry it.
    secret: str = Field(min_length=MIN_SECRET_LENGTH, max_length=MAX_SECRET_LENGTH, repr=False,
                        json_schema_extra={"writeOnly": True, "format": "password"},
                        description="signs every delivery; a whsec_ secret is base64, any other is used as "
                                    "its UTF-8 bytes")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError("must not contain white space or control characters")
        try:
            url = URL(value)
        except (ValueError, TypeError):
            raise ValueError("must be an http:// or https:// URL") from None
        if url.scheme not in ("http", "https") or not url.host or not url.is_absolute():
            raise ValueError("must be an absolute http:// or https:// URL")
        if url.fragment:
            raise ValueError("must not have a fragment")
        return value

    @field_validator("events")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({event for event in value if value.count(event) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return value

    @field_validator("secret")
    @classmethod
    def _usable(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError("must not start or end with white space")
        if value.startswith(WHSEC_PREFIX):
            try:
                key = signing_key(value)
            except (binascii.Error, ValueError):
                raise ValueError(f"a {WHSEC_PREFIX} secret must be followed by base64") from None
            if len(key) < MIN_SECRET_LENGTH:
                raise ValueError(f"a {WHSEC_PREFIX} secret must hold at least {MIN_SECRET_LENGTH} bytes")
        return value


class WebhookView(Wire):
    """A webhook as every answer shows it: never its secret."""

    id: str
    url: str
    events: list[str]
    secret_set: bool = True
    created_at: datetime


class Attempt(Wire):
    """One try at a delivery: when, what came back (a status, or why there was none), how long."""

    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float


class DeliveryView(Wire):
    """One event for one webhook: sent until the receiver answers 2xx, or retries run out."""

    id: str  # also the webhook-id header of every attempt
    webhook_id: str
    event: str
    event_id: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    payload: dict[str, Any]
    history: list[Attempt] = Field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """With its nulls: a delivery always shows the same fields."""
        return self.model_dump(mode="json", by_alias=True)
