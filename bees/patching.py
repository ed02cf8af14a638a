"""Applying a ``config-update`` patch to a bee's config: pure functions, no I/O.

A patch is a flat JSON object. ``enabled`` switches the bee's work on or off; every other
key replaces that top-level field of the config (no deep merge, so a patch is easy to
predict), and the result must validate against the worker's own config model.

Validation may be given a context: what a config model needs to know about the bee's
environment, such as a default address, to tell a usable config from one that is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError, ValidationInfo

if TYPE_CHECKING:
    from bees.env import BeeEnv

C = TypeVar("C", bound=BaseModel)


class ConfigRejected(Exception):
    """A patch or initial config the worker's model refuses; ``errors`` name the fields."""

    def __init__(self, message: str, errors: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors

    @property
    def fields(self) -> list[str]:
        return [e["field"] for e in self.errors]


def _errors(model: type[BaseModel], exc: ValidationError) -> list[dict[str, str]]:
    # A field checked from its default is located by its Python name: report the wire name.
    return [{"field": ".".join(str(p) for p in _wire_loc(model, err["loc"])) or "(config)", "message": err["msg"]}
            for err in exc.errors()]


def _wire_loc(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    if loc and isinstance(loc[0], str):
        return (wire_name(model, loc[0]), *loc[1:])
    return loc


def _rejected(errors: list[dict[str, str]]) -> ConfigRejected:
    text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return ConfigRejected(f"invalid config: {text}", errors)


def wire_name(model: type[BaseModel], key: str) -> str:
    """The name ``key`` has on the wire (its alias), whether given as alias or field name."""
    info = model.model_fields.get(key)
    if info is not None and info.alias:
        return info.alias
    return key


def config_context(env: BeeEnv) -> dict[str, Any]:
    """The validation context of a bee's configs: its environment."""
    return {"env": env}


def context_env(info: ValidationInfo) -> BeeEnv | None:
    """For config validators: the bee environment of the context, None when validated without."""
    return (info.context or {}).get("env")


def parse_config(model: type[C], data: dict[str, Any], context: dict[str, Any] | None = None) -> C:
    """Validate a whole config, e.g. ``CP_BEE_CONFIG`` at start-up."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise _rejected(_errors(model, exc)) from None


def apply_patch(model: type[C], current: C, patch: Any,
                context: dict[str, Any] | None = None) -> tuple[C, bool | None]:
    """Return the patched config and the requested ``enabled`` (None: unchanged).

    Raises ``ConfigRejected`` and leaves ``current`` untouched when the patch is invalid.
    """
    if not isinstance(patch, dict):
        raise _rejected([{"field": "patch", "message": "must be a JSON object"}])
    rest = dict(patch)
    enabled = rest.pop("enabled", None)
    if enabled is not None and not isinstance(enabled, bool):
        raise _rejected([{"field": "enabled", "message": "must be true or false"}])
    merged = current.model_dump(by_alias=True)
    for key, value in rest.items():
        merged[wire_name(model, key)] = value
    return parse_config(model, merged, context), enabled
