"""Base classes of the wire models: camelCase on the wire, snake_case in Python; and the
snake_case models of the surfaces whose documents write their fields that way."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Wire(BaseModel):
    """Base of every wire model: camelCase on the wire, unknown fields tolerated."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Strict(Wire):
    """Input from callers: unknown fields are refused so typos do not pass silently."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Snake(BaseModel):
    """Field names as written (a surface document's snake_case); unknown fields ignored."""

    model_config = ConfigDict(extra="ignore")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SnakeStrict(Snake):
    """A request body: unknown fields are refused so a typo does not pass silently."""

    model_config = ConfigDict(extra="forbid")
