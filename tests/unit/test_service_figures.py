"""Pure logic of the services dashboard: Docker CLI figures, log parsing, the read model,
and what a recreated container keeps."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from controlplane.contract.services import (
    Sample, ServiceReport, ServiceState, log_level, parse_log_line, stats_figures,
)
from controlplane.gateway.surfaces.services.view import Ambiguous, ServicesView
from controlplane.runtime.recreate import create_args, launch_view, other_networks

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)


def reading(total: int, system: int, usage: int = 600, limit: int = 1000, inactive: int = 100,
            pre: tuple[int, int] | None = None) -> dict:
    stats = {"cpu_stats": {"cpu_usage": {"total_usage": total}, "system_cpu_usage": system, "online_cpus": 2},
             "memory_stats": {"usage": usage, "limit": limit, "stats": {"inactive_file": inactive}}}
    stats["precpu_stats"] = {"cpu_usage": {"total_usage": pre[0]}, "system_cpu_usage": pre[1]} if pre else {}
    return stats


def test_stats_figures_follow_the_docker_cli() -> None:
    # 50 of 1000 system ticks on 2 CPUs: 10 %; memory without the inactive page cache.
    cpu, usage, limit, percent = stats_figures(reading(1050, 11000, pre=(1000, 10000)))
    assert (cpu, usage, limit, percent) == (10.0, 500, 1000, 50.0)
    # A one-shot reading has no precpu: the delta comes from the previous reading.
    assert stats_figures(reading(1100, 12000), previous=reading(1050, 11000))[0] == 10.0
    assert stats_figures(reading(1100, 12000))[0] == 0.0  # nothing to compare with yet
    cgroup_v1 = reading(0, 0, usage=800, limit=1000)
    cgroup_v1["memory_stats"]["stats"] = {"total_inactive_file": 300}
    assert stats_figures(cgroup_v1)[1:] == (500, 1000, 50.0)


@pytest.mark.parametrize("line, level", [
    ("ERROR cannot connect", "error"),
    ("2025-05-05 10:00:00 WARN slow answer", "warning"),
    ('{"level": "debug", "msg": "x"}', "debug"),
    ('{"levelname": "CRITICAL"}', "critical"),
    ("listening on :8000", "info"),
    ("a message that names a level only far into it: " + "x" * 40 + " error", "info"),
])
def test_log_levels(line: str, level: str) -> None:
    assert log_level(line) == level


def test_log_lines_keep_their_timestamp_cut_to_microseconds() -> None:
    line = parse_log_line("2025-05-05T10:00:00.123456789Z Service started successfully", "stderr")
    assert (line.timestamp, line.message, line.level, line.stream) == \
        ("2025-05-05T10:00:00.123456Z", "Service started successfully", "info", "stderr")
    assert parse_log_line("no stamp here").timestamp is None


def state(cid: str, name: str, host: str = "h1", status: str = "running", **more: object) -> ServiceState:
    return ServiceState(container_id=cid, name=name, title=name, host=host, state=status, health="none",
                        image="img", image_id="sha256:1", started_at=NOW - timedelta(seconds=90), **more)


def sample(cpu: float, memory: float, usage: int) -> Sample:
    return Sample(cpu=cpu, memory=memory, memory_usage=usage, memory_limit=usage * 4, sampled_at=NOW)


def test_the_read_model_follows_reports_and_finds_by_id_name_or_prefix() -> None:
    view = ServicesView()
    view.apply(ServiceReport(host="h1", full=True, services=[state("aaaa1111", "web"), state("aaaa2222", "db"),
                                                           state("bbbb3333", "old", status="exited", exit_code=1)]))
    assert view.find("web").container_id == "aaaa1111" and view.find("bbbb").name == "old"
    assert view.find("aaa") is None  # too short to be taken as a prefix
    with pytest.raises(Ambiguous):
        view.find("aaaa")
    # An update: the name now belongs to a new container.
    view.apply(ServiceReport(host="h1", services=[state("cccc4444", "web")]))
    assert view.find("web").container_id == "cccc4444" and "aaaa1111" not in view.services
    view.apply(ServiceReport(host="h1", removed=["aaaa2222"]))
    assert view.find("db") is None
    # A full report of one host replaces that host's services only.
    view.apply(ServiceReport(host="h2", full=True, services=[state("dddd5555", "other", host="h2")]))
    view.apply(ServiceReport(host="h1", full=True, services=[state("cccc4444", "web")]))
    assert sorted(s.name for s in view.listed("all")) == ["other", "web"]


def test_summary_stats_and_system_figures() -> None:
    view = ServicesView()
    view.apply(ServiceReport(host="h1", full=True, services=[
        state("a1", "a"), state("b2", "b"), state("c3", "c", status="exited", exit_code=137),
        state("d4", "d", status="restarting")],
        samples={"a1": sample(10.0, 20.0, 100), "b2": sample(30.0, 40.0, 300)}))
    summary = view.summary(view.services["a1"], now=NOW)
    assert summary["stats"] == {"cpu": 10.0, "memory": 20.0, "uptime": 90, "restartCount": 0}
    assert summary["id"] == "a" and summary["status"] == "running"
    assert view.stats(view.services["c3"])["sampled"] is False
    system = view.system()
    assert system["services"] == {"total": 4, "running": 2, "stopped": 2}
    assert system["resources"] == {"avgCpu": 20.0, "avgMemory": 30.0, "totalMemoryUsage": 400}
    assert system["health"] == {"status": "unhealthy", "warnings": 1, "errors": 1}
    assert [s.name for s in view.listed("stopped")] == ["c", "d"]


def inspected() -> dict:
    return {
        "Id": "0123456789abcdef", "Name": "/web", "Image": "sha256:old",
        "Config": {"Image": "app:latest", "Env": ["PATH=/bin", "MODE=prod"], "Cmd": ["serve"],
                   "Labels": {"org.opencontainers.image.version": "1", "team": "blue"}, "Hostname": "0123456789ab",
                   "ExposedPorts": {"8000/tcp": {}}, "WorkingDir": "/app"},
        "HostConfig": {"NetworkMode": "appnet", "PortBindings": {"8000/tcp": [{"HostPort": "8080"}]},
                       "RestartPolicy": {"Name": "always"}, "Binds": ["/srv/data:/data"], "Privileged": False},
        "Mounts": [{"Type": "bind", "Source": "/srv/data", "Destination": "/data"},
                   {"Type": "volume", "Name": "anon123", "Destination": "/cache"}],
        "NetworkSettings": {"Networks": {"appnet": {"Aliases": ["web", "0123456789ab"]}, "extra": {}}},
    }


def test_a_recreated_container_keeps_what_it_was_given_and_takes_the_new_images_defaults() -> None:
    old_image = {"Config": {"Env": ["PATH=/bin"], "Cmd": ["serve"], "Labels": {"org.opencontainers.image.version": "1"},
                            "WorkingDir": "/app"}}
    args = create_args(inspected(), old_image, "app:latest", "web")
    assert args["environment"] == ["MODE=prod"] and args["labels"] == {"team": "blue"}
    assert "command" not in args and "working_dir" not in args and "hostname" not in args
    assert args["host_config"]["RestartPolicy"] == {"Name": "always"}
    assert args["host_config"]["Binds"] == ["/srv/data:/data", "anon123:/cache"]
    assert args["networking_config"] == {"EndpointsConfig": {"appnet": {"Aliases": ["web"]}}}
    assert other_networks(inspected()) == {"extra": {}}
    spec = launch_view(inspected())
    assert spec.network == "appnet" and [m.source for m in spec.mounts] == ["/srv/data"]
