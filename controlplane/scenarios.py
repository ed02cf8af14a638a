"""Scenario templates: the YAML files in ``scenarios/`` a swarm or a pool is created from.

Each file is validated on load; a broken file is reported with its problems and left out,
so one bad scenario never hides the good ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from controlplane.contract.models import SwarmPlan, Template
from controlplane.contract.pool import PoolSpec

if TYPE_CHECKING:
    from controlplane.config import Settings


@dataclass
class Catalog:
    templates: dict[str, Template] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # file name -> why it was left out

    def get(self, template_id: str) -> Template | None:
        return self.templates.get(template_id)


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors())


def load_catalog(folder: Path) -> Catalog:
    catalog = Catalog()
    for path in sorted(folder.glob("*.y*ml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            template = Template.model_validate(data)
        except yaml.YAMLError as exc:
            catalog.problems[path.name] = f"not valid YAML: {exc}"
            continue
        except ValidationError as exc:
            catalog.problems[path.name] = _describe(exc)
            continue
        if template.id in catalog.templates:
            catalog.problems[path.name] = f"template id {template.id!r} is already defined by another file"
            continue
        catalog.templates[template.id] = template
    return catalog


class PoolConfigError(ValueError):
    """The configured engine pool cannot be built; the message names the setting at fault."""


def configured_pool(settings: Settings, catalog: Catalog) -> SwarmPlan | None:
    """The plan of the engine pool the settings configure: the ``CP_ACE_TEMPLATE`` scenario's
    pool, its image ``CP_ACE_IMAGE``, its VPN ``CP_VPN_CONTAINER``, and ``CP_ACE_POOL``'s
    overrides on top. None when ``CP_ACE_POOL_ID`` is empty."""
    if not settings.ace_pool_id:
        return None
    template = catalog.get(settings.ace_template)
    if template is None or template.pool is None:
        why = catalog.problems.get(f"{settings.ace_template}.yaml", "no scenario with that id has a pool")
        raise PoolConfigError(f"CP_ACE_TEMPLATE={settings.ace_template!r}: {why}")
    fields = template.pool.model_dump(mode="json", by_alias=True, exclude_none=True)
    fields["image"] = settings.ace_image
    if settings.vpn_container:
        fields["vpnContainer"] = settings.vpn_container
    try:
        pool = PoolSpec.model_validate(_merged(fields, settings.ace_pool))
    except ValidationError as exc:
        raise PoolConfigError(f"CP_ACE_POOL: {_describe(exc)}") from None
    return SwarmPlan(pool=pool)


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` on top of ``base``; nested objects are merged, not replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        name = to_camel(key)  # snake_case names are accepted too
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merged(merged[name], value)
        else:
            merged[name] = value
    return merged
