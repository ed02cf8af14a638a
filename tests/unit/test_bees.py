"""Pure logic of the bee SDK: environment, config patches, pacing, rates."""

from __future__ import annotations

import pytest

from bees.env import BeeEnv
from bees.generator import GeneratorConfig, make_message
from bees.pacing import MAX_BATCH, MAX_LAG_S, Pacer
from bees.patching import ConfigRejected, apply_patch, parse_config
from bees.stats import Totals, rates

# --- environment ---------------------------------------------------------------------


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> BeeEnv:
    base = {"CP_SWARM_ID": "s1", "CP_ROLE": "generator", "CP_INSTANCE": "s1-gen"}
    for key, value in (base | values).items():
        monkeypatch.setenv(key, value)
    return BeeEnv()


def test_env_defaults_and_json_config(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(monkeypatch, CP_BEE_CONFIG='{"ratePerSec": 3}', CP_WORK_OUT="out", CP_WORK_IN="")
    assert env.bee_config == {"ratePerSec": 3}
    assert env.work_out == "out" and env.work_in is None
    assert env.enabled is False and env.status_interval_s == 5.0 and env.topology_file is None


def test_env_refuses_ids_that_cannot_be_key_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="instance"):
        _env(monkeypatch, CP_INSTANCE="Not.A.Slug")


# --- config patches ------------------------------------------------------------------


def test_patch_merges_fields_and_takes_enabled_out() -> None:
    current = GeneratorConfig()
    config, enabled = apply_patch(GeneratorConfig, current, {"enabled": True, "ratePerSec": 20})
    assert enabled is True
    assert config.rate_per_sec == 20 and config.message == {"hello": "world"}
    assert current.rate_per_sec == 1.0  # untouched


def test_patch_accepts_field_names_as_well_as_wire_names() -> None:
    config, enabled = apply_patch(GeneratorConfig, GeneratorConfig(), {"rate_per_sec": 7})
    assert config.rate_per_sec == 7 and enabled is None


def test_patch_replaces_top_level_fields_whole() -> None:
    current = GeneratorConfig(message={"a": 1, "b": 2})
    config, _ = apply_patch(GeneratorConfig, current, {"message": {"c": 3}})
    assert config.message == {"c": 3}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"ratePerSec": -5}, "ratePerSec"),
        ({"ratePerSec": 10001}, "ratePerSec"),
        ({"ratePerSec": "fast"}, "ratePerSec"),
        ({"message": "not an object"}, "message"),
        ({"ratePerSek": 3}, "ratePerSek"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_invalid_patch_is_rejected_naming_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigRejected) as caught:
        apply_patch(GeneratorConfig, GeneratorConfig(), patch)
    assert caught.value.fields == [field]
    assert field in str(caught.value)


def test_patch_must_be_an_object() -> None:
    with pytest.raises(ConfigRejected, match="patch"):
        apply_patch(GeneratorConfig, GeneratorConfig(), ["ratePerSec", 3])


def test_initial_config_is_validated_too() -> None:
    assert parse_config(GeneratorConfig, {}).rate_per_sec == 1.0
    with pytest.raises(ConfigRejected, match="ratePerSec"):
        parse_config(GeneratorConfig, {"ratePerSec": -1})


def test_generator_message_adds_seq_and_ts_to_the_template() -> None:
    message = make_message({"hello": "world"}, 7)
    assert message["hello"] == "world" and message["seq"] == 7 and "T" in message["ts"]


# --- pacing ----------------------------------------------------------------------------


def _run(pacer: Pacer, start: float, end: float, step: float) -> list[float]:
    """Send times produced by a loop that wakes every ``step`` seconds."""
    sent: list[float] = []
    t = start
    while t < end:
        sent += [t] * pacer.take(t)
        t += step
    return sent


def test_pacer_spreads_messages_evenly() -> None:
    pacer = Pacer(rate=20, origin=0.0)
    assert pacer.take(0.0) == 1  # the first message goes at once
    assert pacer.take(0.01) == 0
    assert pacer.wait(0.01) == pytest.approx(0.04)
    assert pacer.take(0.05) == 1
    sent = _run(Pacer(rate=20, origin=0.0), 0.0, 1.0, 0.001)
    assert len(sent) == 20
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert min(gaps) == pytest.approx(0.05, abs=0.002)


def test_pacer_catches_up_small_delays_without_loss() -> None:
    pacer = Pacer(rate=100, origin=0.0)
    pacer.take(0.0)
    assert pacer.take(0.1) == 10  # woke late: what is due is sent


def test_pacer_restarts_after_a_long_stall_instead_of_bursting() -> None:
    pacer = Pacer(rate=100, origin=0.0)
    pacer.take(0.0)
    assert pacer.take(MAX_LAG_S + 5.0) == 1
    assert pacer.wait(MAX_LAG_S + 5.0) == pytest.approx(0.01)


def test_pacer_batches_are_bounded() -> None:
    pacer = Pacer(rate=10000, origin=0.0)
    assert pacer.take(0.2) == MAX_BATCH


def test_rate_change_applies_from_the_last_message() -> None:
    pacer = Pacer(rate=1, origin=0.0)
    assert pacer.take(0.0) == 1
    pacer.set_rate(20, now=0.2)  # next due 0.05 after the last message: already past, so now
    assert pacer.take(0.2) == 1  # one message, not a backlog for the time before the change
    assert pacer.wait(0.2) == pytest.approx(0.05)
    slower = Pacer(rate=20, origin=0.0)
    slower.take(0.0)
    slower.set_rate(1, now=0.01)
    assert slower.wait(0.01) == pytest.approx(0.99)


def test_zero_rate_sends_nothing_and_waits_for_a_change() -> None:
    pacer = Pacer(rate=0, origin=0.0)
    assert pacer.take(10.0) == 0 and pacer.wait(10.0) is None
    pacer.set_rate(5, now=10.0)
    assert pacer.take(10.0) == 1


# --- rates -----------------------------------------------------------------------------


def test_rates_are_per_second_over_the_interval() -> None:
    before, after = Totals(processed=10, published=0), Totals(processed=30, published=5, errors=1)
    assert rates(before, after, 2.0) == {"processed": 10.0, "errors": 0.5, "published": 2.5}
    assert rates(before, after, 0.0) == {"processed": 0.0, "errors": 0.0, "published": 0.0}
