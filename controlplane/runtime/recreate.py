"""A container's configuration, read back from its inspect document, to create it again on
another image (a service update).

What the container was given is kept: its environment, labels, command, ports, mounts,
networks, restart policy and limits. What it had only because its old image said so is
left for the new image to say: an environment variable, a label, a command, an entrypoint
or a working directory equal to the old image's default is not copied, so an image whose
defaults changed (its version label first) shows its new ones.
"""

from __future__ import annotations

from typing import Any

from controlplane.runtime.model import ContainerSpec, Mount

_DEFAULT_NETWORKS = frozenset({"default", "bridge", "host", "none"})


def create_args(attrs: dict[str, Any], old_image: dict[str, Any], image: str, name: str) -> dict[str, Any]:
    """Keyword arguments of the SDK's ``create_container`` for the same container on ``image``."""
    config = attrs.get("Config") or {}
    defaults = old_image.get("Config") or {}
    image_env = set(defaults.get("Env") or ())
    image_labels = defaults.get("Labels") or {}
    host_config = dict(attrs.get("HostConfig") or {})
    # Anonymous volumes keep their data: mounted again by name where the old ones were.
    named = {m.get("Name") for m in host_config.get("Mounts") or ()} | \
        {b.split(":", 1)[0] for b in host_config.get("Binds") or ()}
    anonymous = [f"{m['Name']}:{m['Destination']}" for m in attrs.get("Mounts") or ()
                 if m.get("Type") == "volume" and m.get("Name") and m["Name"] not in named]
    if anonymous:
        host_config["Binds"] = list(host_config.get("Binds") or ()) + anonymous
    args: dict[str, Any] = {
        "image": image,
        "name": name,
        "environment": [e for e in config.get("Env") or () if e not in image_env],
        "labels": {k: v for k, v in (config.get("Labels") or {}).items() if image_labels.get(k) != v},
        "command": _unless_default(config.get("Cmd"), defaults.get("Cmd")),
        "entrypoint": _unless_default(config.get("Entrypoint"), defaults.get("Entrypoint")),
        "working_dir": _unless_default(config.get("WorkingDir"), defaults.get("WorkingDir")) or None,
        "user": _unless_default(config.get("User"), defaults.get("User")) or None,
        "ports": [_port(p) for p in config.get("ExposedPorts") or {} if p not in (defaults.get("ExposedPorts") or {})],
        "tty": bool(config.get("Tty")),
        "stdin_open": bool(config.get("OpenStdin")),
        "stop_signal": _unless_default(config.get("StopSignal"), defaults.get("StopSignal")),
        "healthcheck": _unless_default(config.get("Healthcheck"), defaults.get("Healthcheck")),
        "host_config": host_config,
    }
    first = first_network(attrs)
    if first is not None:
        args["networking_config"] = {"EndpointsConfig": {first: _endpoint(attrs, first)}}
    if config.get("Hostname") and not str(attrs.get("Id", "")).startswith(config["Hostname"]):
        args["hostname"] = config["Hostname"]  # one the caller chose, not the id Docker gave it
    return {key: value for key, value in args.items() if value is not None}


def first_network(attrs: dict[str, Any]) -> str | None:
    """The user-defined network the container was created on (its network mode), if any."""
    mode = str((attrs.get("HostConfig") or {}).get("NetworkMode") or "")
    return None if mode in _DEFAULT_NETWORKS or mode.startswith("container:") else mode


def other_networks(attrs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Networks the container was connected to after its creation, with their endpoints."""
    first = first_network(attrs)
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    return {name: _endpoint(attrs, name) for name in networks if name != first and name not in _DEFAULT_NETWORKS}


def launch_view(attrs: dict[str, Any]) -> ContainerSpec:
    """What the container asks of the engine, in the terms the runtime policy checks."""
    host = attrs.get("HostConfig") or {}
    binds = [b.split(":") for b in host.get("Binds") or ()]
    mounts = [Mount(parts[0], parts[1] if len(parts) > 1 else parts[0]) for parts in binds if parts[0].startswith("/")]
    mounts += [Mount(m["Source"], m.get("Target", "")) for m in host.get("Mounts") or () if m.get("Type") == "bind"]
    return ContainerSpec(name=str(attrs.get("Name", "")).lstrip("/"), image=(attrs.get("Config") or {}).get("Image", ""),
                         labels=(attrs.get("Config") or {}).get("Labels") or {}, network=host.get("NetworkMode"),
                         mounts=tuple(mounts), privileged=bool(host.get("Privileged")))


def _endpoint(attrs: dict[str, Any], network: str) -> dict[str, Any]:
    found = ((attrs.get("NetworkSettings") or {}).get("Networks") or {}).get(network) or {}
    short_id = str(attrs.get("Id", ""))[:12]
    aliases = [a for a in found.get("Aliases") or () if a != short_id]
    endpoint: dict[str, Any] = {}
    if aliases:
        endpoint["Aliases"] = aliases
    if found.get("IPAMConfig"):
        endpoint["IPAMConfig"] = found["IPAMConfig"]
    return endpoint


def _unless_default(value: Any, default: Any) -> Any:
    return None if value == default else value


def _port(port: str) -> tuple[int, str] | int:
    number, _, proto = port.partition("/")
    return (int(number), proto) if proto else int(number)
