"""Scenario templates: the shipped ones load, and a bad file is reported without hiding the rest."""

from __future__ import annotations

from pathlib import Path

from controlplane.scenarios import load_catalog

SHIPPED = Path(__file__).resolve().parents[2] / "scenarios"

GOOD = """
id: good
bees:
  - {name: gen, role: generator, image: controlplane:local, work: {out: q}}
"""


def test_shipped_scenarios_are_all_valid() -> None:
    catalog = load_catalog(SHIPPED)
    assert catalog.problems == {}
    assert {"generator-demo", "http-load", "http-trigger"} <= set(catalog.templates)
    load = catalog.templates["http-load"].plan()
    assert load.sut is not None
    assert [b.name for b in load.start_order()] == ["postprocessor", "processor", "moderator", "generator"]


def test_invalid_files_are_reported_and_the_others_still_load(tmp_path: Path) -> None:
    (tmp_path / "a-good.yaml").write_text(GOOD)
    (tmp_path / "b-broken.yaml").write_text("id: [unclosed\n")
    (tmp_path / "c-unknown-field.yaml").write_text(GOOD.replace("id: good", "id: other\nprivileged: true"))
    (tmp_path / "d-duplicate.yml").write_text(GOOD)
    (tmp_path / "e-cycle.yaml").write_text("""
id: cycle
bees:
  - {name: a, role: generator, image: x, dependsOn: [b]}
  - {name: b, role: generator, image: x, dependsOn: [a]}
""")
    (tmp_path / "f-sut-name.yaml").write_text("""
id: sut-name
sut: {image: controlplane:local, port: 18080}
bees:
  - {name: sut, role: processor, image: controlplane:local}
""")
    catalog = load_catalog(tmp_path)
    assert list(catalog.templates) == ["good"]
    problems = catalog.problems
    assert set(problems) == {"b-broken.yaml", "c-unknown-field.yaml", "d-duplicate.yml", "e-cycle.yaml",
                             "f-sut-name.yaml"}
    assert problems["b-broken.yaml"].startswith("not valid YAML")
    assert "privileged" in problems["c-unknown-field.yaml"]
    assert "already defined" in problems["d-duplicate.yml"]
    assert "cycle" in problems["e-cycle.yaml"]
    assert "'sut'" in problems["f-sut-name.yaml"]


def test_every_shipped_bee_config_is_valid_for_its_bee() -> None:
    """A scenario that passes the catalogue but whose bee would refuse its config at start-up
    would only fail on create; check each config against its worker's own model here."""
    from bees.__main__ import worker_factory
    from bees.env import BeeEnv
    from bees.patching import config_context, parse_config

    for template in load_catalog(SHIPPED).templates.values():
        for bee in template.bees:
            env = BeeEnv(swarm_id="s", role=bee.role, instance="s-x",
                         sut_url="http://127.0.0.1:1" if template.sut else None)
            parse_config(worker_factory(bee.role).Config, bee.config, config_context(env))
