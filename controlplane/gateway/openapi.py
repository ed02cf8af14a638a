"""The gateway's OpenAPI description, served at ``/openapi.json``.

Request and envelope schemas come from the same pydantic models the handlers validate
with, so the description cannot drift from what the gateway accepts. Each surface lists its
operations as ``Op`` values next to its routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from controlplane.contract.models import Envelope

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "fields": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "reason": {"type": "string"}}}},
    },
}
REASONS = {200: "OK", 202: "Accepted: the correlation envelope", 400: "Invalid request", 401: "Missing bearer key",
           403: "Wrong bearer key", 404: "Not found", 409: "Conflict with the current state or an open operation",
           422: "Unprocessable: reused idempotencyKey or unknown reference", 503: "Broker or store unavailable"}


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    body: type[BaseModel] | None = None
    statuses: tuple[int, ...] = (200,)
    response: type[BaseModel] | None = None  # schema of the success body; None: a JSON object
    many: bool = False  # the success body is a JSON array of ``response``
    mutating: bool = False
    tags: tuple[str, ...] = field(default=())
    query: tuple[str, ...] = ()  # optional string query parameters
    # Who may call it: "default" (writes need the admin key, reads need a key once reads are
    # guarded), "protected" (a key even for a read) or "open" (no key, like /metrics).
    access: Literal["default", "protected", "open"] = "default"


def document(ops: list[Op], title: str = "controlplane", open_paths: frozenset[str] | None = None) -> dict[str, Any]:
    """``open_paths``: when reads need a key, the paths that still do not; None: reads are open."""
    models = {m for op in ops for m in (op.body, op.response) if m is not None} | {Envelope}
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        operation: dict[str, Any] = {"summary": op.summary, "operationId": _operation_id(op), "responses": {}}
        if op.tags:
            operation["tags"] = list(op.tags)
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in re.findall(r"{(\w+)}", op.path)]
        params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in op.query]
        if params:
            operation["parameters"] = params
        if op.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{op.body.__name__}"}}}}
        statuses = op.statuses
        guarded = op.mutating or (open_paths is not None and op.path not in open_paths)
        if op.access == "protected" or (guarded and op.access != "open"):
            operation["security"] = [{"bearer": []}]
            statuses = tuple(sorted({*statuses, 401, 403}))
        for status in statuses:
            if status < 400:
                schema = {"$ref": f"#/components/schemas/{op.response.__name__}"} if op.response else {"type": "object"}
                if op.many:
                    schema = {"type": "array", "items": schema}
            else:
                schema = {"$ref": "#/components/schemas/Error"}
            operation["responses"][str(status)] = {"description": REASONS.get(status, ""),
                                                   "content": {"application/json": {"schema": schema}}}
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {
            "schemas": {**defs.get("$defs", {}), "Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation_id(op: Op) -> str:
    words = re.sub(r"[{}]", "", op.path).strip("/").replace("/", "-")
    return f"{op.method.lower()}-{words}"
