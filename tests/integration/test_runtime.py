"""DockerRuntime against the real Docker engine, with a tiny local busybox image."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest

from controlplane.runtime import (
    ContainerSpec,
    DockerRuntime,
    ImageMissing,
    Mount,
    PolicyViolation,
    RuntimePolicy,
    RuntimeUnavailable,
)
from controlplane.runtime.labels import SWARM, LabelView, filter_for, managed_labels

pytestmark = pytest.mark.integration

DOCKER_URL = os.environ.get("CP_DOCKER_URL", "unix:///var/run/docker.sock")
IMAGE = "controlplane-busybox:local"
MISSING_IMAGE = "controlplane-does-not-exist:none"
SLEEP = ["sleep", "300"]
# The missing image is allowed too: its test is about the engine, not the policy.
BEES_ON_BUSYBOX = RuntimePolicy(allowed_images={"bee": frozenset({IMAGE, MISSING_IMAGE})})


def _busybox_rootfs_tar() -> bytes:
    """A root filesystem holding only a static busybox and the applets the tests use."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        subprocess.run(["apt-get", "install", "-y", "busybox-static"], check=True, capture_output=True)
        busybox = "/bin/busybox"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "sleep", "echo"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def busybox_image() -> str:
    client = docker.APIClient(base_url=DOCKER_URL, version="auto")
    try:
        try:
            client.inspect_image(IMAGE)
        except docker.errors.ImageNotFound:
            repository, tag = IMAGE.split(":")
            client.import_image_from_data(_busybox_rootfs_tar(), repository=repository, tag=tag)
        return IMAGE
    finally:
        client.close()


@pytest.fixture(scope="session")
def run_swarm() -> str:
    """A swarm label unique to this run, so listings never see other runs' containers."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def runtime(busybox_image: str, run_swarm: str) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(DOCKER_URL, workers=8, policy=BEES_ON_BUSYBOX)
    try:
        yield rt
    finally:
        for info in await rt.list(filter_for(swarm_id=run_swarm)):
            await rt.remove(info.id)
        await rt.close()


@pytest.fixture
def make_spec(busybox_image: str, run_swarm: str) -> Iterator[object]:
    """Specs named and labelled for this run; every container carries the run's swarm label."""

    def make(suffix: str, **overrides: object) -> ContainerSpec:
        fields: dict[str, object] = {
            "name": f"cp-test-{run_swarm}-{suffix}",
            "image": busybox_image,
            "labels": managed_labels("bee", owner="test", swarm_id=run_swarm, role="test", instance=suffix),
            "command": SLEEP,
        }
        fields.update(overrides)
        return ContainerSpec(**fields)  # type: ignore[arg-type]

    yield make


async def test_ensure_running_is_idempotent_and_restarts(runtime: DockerRuntime, make_spec) -> None:
    spec = make_spec("idem")
    first = await runtime.ensure_running(spec)
    second = await runtime.ensure_running(spec)
    assert first.id == second.id
    assert second.state == "running"
    assert second.name == spec.name
    assert second.image == IMAGE
    assert second.started_at is not None
    assert second.exit_code is None
    assert LabelView.from_labels(second.labels).instance == "idem"

    await runtime.stop(spec.name, timeout=1)
    stopped = await runtime.get(spec.name)
    assert stopped is not None and stopped.id == first.id
    assert stopped.state == "exited"
    assert stopped.exit_code is not None

    again = await runtime.ensure_running(spec)
    assert again.id == first.id
    assert again.state == "running"

    await runtime.remove(spec.name)
    await runtime.remove(spec.name)
    assert await runtime.get(spec.name) is None
    await runtime.stop(spec.name)  # missing: no error


async def test_start_new_starts_a_new_name_and_adopts_only_its_own_half_made_container(
        runtime: DockerRuntime, make_spec) -> None:
    spec = make_spec("fresh")
    started = await runtime.start_new(spec)
    inspected = await runtime.get(spec.name)
    assert inspected is not None and inspected.id == started.id and inspected.state == "running"
    # A create that went through before its answer was lost: the retry finds it and starts it.
    halfway = make_spec("halfway")
    created = runtime._client().create_container(**runtime._create_args(halfway))
    adopted = await runtime.start_new(halfway)
    assert adopted.id == created["Id"] and adopted.state == "running"
    # The same name on someone else's container is refused.
    foreign = make_spec("fresh", labels=managed_labels("bee", owner="other", swarm_id=spec.labels["controlplane.swarm"],
                                                       role="test", instance="fresh"))
    with pytest.raises(PolicyViolation) as refused:
        await runtime.start_new(foreign)
    assert refused.value.code == "name-taken"


async def test_list_by_labels_finds_exactly_this_runs_containers(runtime: DockerRuntime, make_spec, run_swarm) -> None:
    a = await runtime.ensure_running(make_spec("list-a"))
    b = await runtime.ensure_running(make_spec("list-b"))
    await runtime.stop(b.id, timeout=1)

    listed = await runtime.list(filter_for(kind="bee", swarm_id=run_swarm))
    assert {info.id for info in listed} == {a.id, b.id}
    assert all(LabelView.from_labels(info.labels).swarm_id == run_swarm for info in listed)

    running = await runtime.list(filter_for(swarm_id=run_swarm), all=False)
    assert [info.id for info in running] == [a.id]

    assert await runtime.list(filter_for(kind="swarm-controller", swarm_id=run_swarm)) == []
    assert await runtime.list({SWARM: f"{run_swarm}-other"}) == []


async def test_missing_image_fails_fast_without_creating(runtime: DockerRuntime, make_spec) -> None:
    spec = make_spec("noimage", image=MISSING_IMAGE)
    assert not await runtime.image_exists(MISSING_IMAGE)
    started = time.monotonic()
    with pytest.raises(ImageMissing) as caught:
        await runtime.ensure_running(spec)
    assert time.monotonic() - started < 5
    assert caught.value.image == MISSING_IMAGE
    assert await runtime.get(spec.name) is None


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"network": "host"}, "CP_ALLOW_HOST_NETWORK"),
        ({"privileged": True}, "CP_ALLOW_PRIVILEGED"),
        ({"mounts": (Mount("/etc", "/host-etc", read_only=True),)}, "CP_ALLOWED_MOUNTS"),
    ],
)
async def test_policy_refuses_by_default(runtime: DockerRuntime, make_spec, overrides, setting) -> None:
    spec = make_spec("refused", **overrides)
    with pytest.raises(PolicyViolation) as caught:
        await runtime.ensure_running(spec)
    assert setting in str(caught.value)
    assert await runtime.get(spec.name) is None


def test_policy_mount_paths() -> None:
    policy = RuntimePolicy(allowed_mounts=("/srv/data", "/var/run/docker.sock"))
    assert policy.mount_allowed("/srv/data")
    assert policy.mount_allowed("/srv/data/sub/dir")
    assert policy.mount_allowed("/var/run/docker.sock")
    assert not policy.mount_allowed("/srv/data/../../etc")
    assert not policy.mount_allowed("/srv/database")
    assert not policy.mount_allowed("srv/data")


async def test_policy_allows_what_the_operator_permits(make_spec, run_swarm, tmp_path: Path) -> None:
    (tmp_path / "greeting").write_text("mounted-ok\n")
    tmp_path.chmod(0o755)  # containers run as a non-root user
    policy = RuntimePolicy(allowed_images=BEES_ON_BUSYBOX.allowed_images, allow_host_network=True,
                           allow_privileged=True, allowed_mounts=(str(tmp_path),))
    policy.check(make_spec("privileged", privileged=True))
    # Privileged containers are only checked, not run: a nested engine may lack the capabilities.
    spec = make_spec(
        "allowed",
        network="host",
        mounts=(Mount(str(tmp_path), "/data", read_only=True),),
        command=["sh", "-c", "read line < /data/greeting; echo $line; sleep 300"],
    )
    policy.check(spec)
    rt = DockerRuntime(DOCKER_URL, workers=2, policy=policy)
    try:
        info = await rt.ensure_running(spec)
        assert info.state == "running"
        assert await _wait_for_log(rt, spec.name, "mounted-ok")
    finally:
        await rt.remove(spec.name)
        await rt.close()


async def test_logs_tail_and_wait_state(runtime: DockerRuntime, make_spec) -> None:
    spec = make_spec("echo", command=["sh", "-c", "echo first; echo hello-from-bee"])
    await runtime.ensure_running(spec)
    done = await runtime.wait_state(spec.name, {"exited"}, timeout=10)
    assert done is not None and done.exit_code == 0
    assert (await runtime.logs_tail(spec.name)).split() == ["first", "hello-from-bee"]
    assert (await runtime.logs_tail(spec.name, lines=1)).strip() == "hello-from-bee"
    assert await runtime.logs_tail(f"{spec.name}-missing") == ""
    assert await runtime.wait_state(spec.name, {"paused"}, timeout=0.3) is None


async def test_list_agrees_with_inspect(runtime: DockerRuntime, make_spec, run_swarm) -> None:
    crashed = make_spec("crashed", command=["sh", "-c", "exit 3"])
    await runtime.ensure_running(crashed)
    assert await runtime.wait_state(crashed.name, {"exited"}, timeout=10) is not None
    await runtime.ensure_running(make_spec("listed-port", ports={"8080/tcp": None}))
    listed = {i.name: i for i in await runtime.list(filter_for(swarm_id=run_swarm))}
    for name in (crashed.name, make_spec("listed-port").name):
        full = await runtime.get(name)
        assert full is not None
        summary = listed[name]
        assert (summary.id, summary.image, summary.state, summary.exit_code, summary.labels, summary.ports) == \
            (full.id, full.image, full.state, full.exit_code, full.labels, full.ports)
    assert listed[crashed.name].exit_code == 3


async def test_published_port_is_reported(runtime: DockerRuntime, make_spec) -> None:
    info = await runtime.ensure_running(make_spec("ports", ports={"8080/tcp": None}))
    host_port = info.ports.get("8080/tcp")
    assert isinstance(host_port, int) and host_port > 0


async def test_concurrent_calls_do_not_block_the_loop(runtime: DockerRuntime, make_spec) -> None:
    ticks: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(heartbeat())
    try:
        distinct = await asyncio.gather(*(runtime.ensure_running(make_spec(f"conc-{i}")) for i in range(5)))
        same_spec = make_spec("conc-same")
        same = await asyncio.gather(*(runtime.ensure_running(same_spec) for _ in range(3)))
    finally:
        stop.set()
        await beat

    assert len({info.id for info in distinct}) == 5
    assert all(info.state == "running" for info in distinct)
    assert len({info.id for info in same}) == 1
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    assert len(ticks) > 5
    assert max(gaps) < 0.25, f"event loop stalled for {max(gaps):.3f}s"


async def _wait_for_log(rt: DockerRuntime, name: str, text: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in await rt.logs_tail(name):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_ping_and_unreachable_engine(runtime: DockerRuntime, tmp_path: Path) -> None:
    await runtime.ping()
    gone = DockerRuntime(f"unix://{tmp_path}/no-docker.sock", workers=1, policy=RuntimePolicy())
    try:
        with pytest.raises(RuntimeUnavailable):
            await gone.ping()
        with pytest.raises(RuntimeUnavailable):
            await gone.get("anything")
    finally:
        await gone.close()
