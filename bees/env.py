"""The environment a bee process is started with: every ``CP_*`` variable it reads.

The swarm-controller sets these on the bee's container; they are validated once at
start-up so a bad value stops the bee with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from controlplane.config import settings_or_exit
from controlplane.contract.egress import Target
from controlplane.contract import keys


class BeeEnv(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CP_", extra="ignore")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    swarm_id: str
    role: str
    instance: str
    work_in: str | None = None  # queue suffix this bee consumes: ph.<swarm>.<suffix>
    work_out: str | None = None  # queue suffix this bee publishes to on the hive exchange
    sut_url: str | None = None  # the swarm's system under test, e.g. http://127.0.0.1:8080
    # Hosts, addresses or networks (with an optional :port) HTTP calls may reach besides the SUT.
    allowed_targets: list[str] = Field(default_factory=list)
    # Config keys the plan marks secret: masked in what the bee reports.
    secret_keys: list[str] = Field(default_factory=list)
    bee_config: dict[str, Any] = Field(default_factory=dict)  # JSON object
    enabled: bool = False
    status_interval_s: float = Field(5.0, gt=0)
    topology_file: Path | None = None  # None: the topology shipped with the package
    log_level: str = "INFO"
    log_format: Literal["console", "json"] = "console"

    @field_validator("swarm_id", "role", "instance")
    @classmethod
    def _slug(cls, value: str) -> str:
        problem = keys.slug_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("allowed_targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        return Target.check_all(value)  # a bad entry stops the bee with its name

    @field_validator("sut_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return None if value == "" else value

    @field_validator("work_in", "work_out", mode="before")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        # An empty variable means "not set": containers often get every variable, some blank.
        if value is None or value == "":
            return None
        problem = keys.slug_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def load_env_or_exit() -> BeeEnv:
    """Validate the environment; print one line per bad variable and exit."""
    return settings_or_exit(BeeEnv, "bee environment")
