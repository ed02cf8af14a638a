"""The services surface's answers: ``{"success": true, "data": ...}`` or
``{"success": false, "error": "<message>", ...}``, as the services dashboard document gives them.

Errors keep the gateway's machine-readable parts beside the document's message: ``code`` (what
the gateway calls ``error``) and ``fields`` (which field is at fault and why), so a client can
act on them without parsing the message.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controlplane.gateway.middleware import ApiError


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"success": True, "data": data}, status=status, headers=headers)


def failure(error: ApiError) -> web.Response:
    body: dict[str, Any] = {"success": False, "error": error.message, "code": error.code}
    if error.fields:
        body["fields"] = error.fields
    body.update(error.extra)
    return web.json_response(body, status=error.status)
