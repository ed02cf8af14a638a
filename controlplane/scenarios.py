"""Scenario templates: the YAML files in ``scenarios/`` a swarm is created from.

Each file is validated on load; a broken file is reported with its problems and left out,
so one bad scenario never hides the good ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from controlplane.contract.models import Template


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
