"""What the control plane sets up through the broker's management API: a broker user for every
container it launches, allowed its own part of the topology and nothing else; and the
topology's queue bounds, as policies.

A bee may declare and read its own control and state queues and its swarm's work queues,
publish on ``ph.control`` only the routing keys of its own events (``ev.<…>.<role>.<instance>``)
and of its state snapshot, and bind only its own signals. A swarm-controller may do the same
for its swarm: its own queues, its bees' queues (it removes them), its swarm's outcomes and
the signals to its bees. RabbitMQ checks both kinds of rule itself: permissions on resource
names, and topic permissions on routing keys (publish) and binding keys (bind). So a bee that
is taken over cannot publish ``sig.swarm-create.x`` or a forged ``ev.ready.swarm-remove.y``,
and cannot publish to any queue through the default exchange.

Passwords are derived (HMAC-SHA256 of the user name under a secret only the controllers
hold), so a container re-created after a restart gets the same credentials without storing
them anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from pydantic import SecretStr
from yarl import URL

from controlplane.bus.management import Management, ManagementError
from controlplane.contract import keys
from controlplane.logs import get_logger

if TYPE_CHECKING:
    from controlplane.config import Settings
    from controlplane.contract.topology import Topology

log = get_logger("accounts")

_SEGMENT = "[a-z0-9-]+"  # one slug: see keys.check_slug


@dataclass(frozen=True)
class Grant:
    """What one user may do, as the regular expressions RabbitMQ matches."""

    configure: str
    write: str
    read: str
    topic_write: str  # routing keys it may publish on ph.control
    topic_read: str  # binding keys it may bind on ph.control


def _any(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$"


def _outcomes(scope: str) -> str:
    """``ev.ready|error.<signal>.<scope>``: exactly one signal segment, so a component named
    like a signal cannot pass one of its outcomes off as another scope's."""
    return rf"ev\.(ready|error)\.{_SEGMENT}\.{scope}"


def _statuses(scope: str) -> str:
    return rf"ev\.status-(full|delta)\.{scope}"


def _work(swarm_id: str) -> str:
    """The swarm's hive exchange and work queues, ``ph.<swarm>.<suffix>``."""
    return rf"ph\.{re.escape(keys.swarm_scope(swarm_id))}\.{_SEGMENT}"


def bee_grant(swarm_id: str, role: str, instance: str) -> Grant:
    own = [re.escape(keys.component_queue(role, instance)), re.escape(keys.state_queue(role, instance))]
    scope = re.escape(keys.component_scope(role, instance))
    state = re.escape(keys.state_key(role, instance))
    exchanges = [re.escape(keys.CONTROL_EXCHANGE)]
    return Grant(
        configure=_any(*own, _work(swarm_id)),
        write=_any(*exchanges, re.escape(keys.DEAD_LETTER_EXCHANGE), *own, _work(swarm_id)),
        read=_any(*exchanges, *own, _work(swarm_id)),
        topic_write=_any(_outcomes(scope), _statuses(scope), state),
        topic_read=_any(rf"sig\.\*\.{scope}", state),
    )


def controller_grant(swarm_id: str) -> Grant:
    instance = keys.controller_instance(swarm_id)
    role = keys.CONTROLLER_ROLE
    own = [re.escape(q) for q in (keys.component_queue(role, instance), keys.replies_queue(role, instance),
                                  keys.state_queue(role, instance))]
    swarm = re.escape(keys.swarm_scope(swarm_id))
    bee = rf"{_SEGMENT}\.{swarm}{keys.INSTANCE_SEPARATOR}{_SEGMENT}"  # <role>.<instance> of one of its bees
    own_scope = re.escape(keys.component_scope(role, instance))
    state = re.escape(keys.state_key(role, instance))
    exchanges = [re.escape(keys.CONTROL_EXCHANGE)]
    return Grant(
        configure=_any(*own, _work(swarm_id), rf"ph\.control\.(state\.)?{bee}"),
        write=_any(*exchanges, re.escape(keys.DEAD_LETTER_EXCHANGE), *own, _work(swarm_id)),
        read=_any(*exchanges, *own, _work(swarm_id)),
        topic_write=_any(
            _outcomes(swarm),  # its swarm's outcomes and its handshake (ev.ready.swarm-controller.<swarm>)
            _outcomes(own_scope), _statuses(own_scope),
            rf"sig\.{_SEGMENT}\.{bee}",  # signals to its bees
            state),
        topic_read=_any(rf"sig\.\*\.{swarm}", rf"sig\.\*\.{own_scope}", rf"ev\.\*\.{bee}", rf"ev\.\*\.\*\.{bee}",
                        rf"ev\.ready\.{re.escape(keys.STREAM_EVENTS)}\.{swarm}",  # a pool's streams, recorded by gateways
                        state),
    )


def gateway_grant(gateway_id: str) -> Grant:
    """A gateway: the shared exchanges and the static queues (it declares them), its own event
    queues; it publishes commands, the timeouts it calls, its readiness probes."""
    static = [re.escape(n) for n in (keys.DEAD_LETTER_QUEUE, keys.HOST_CONTROLLER_QUEUE,
                                     keys.HOST_CONTROLLER_REPLIES_QUEUE, keys.HOST_CONTROLLER_REQUESTS_QUEUE)]
    exchanges = [re.escape(keys.CONTROL_EXCHANGE), re.escape(keys.DEAD_LETTER_EXCHANGE)]
    # Its event queues, and the reply queues of its requesters (stream negotiations).
    own = (rf"{re.escape(keys.CONTROL_EXCHANGE)}\.(gateway\.{re.escape(gateway_id)}(\.status)?"
           rf"|replies\.{re.escape(gateway_id)}\.[a-z0-9]+)")
    return Grant(
        configure=_any(*exchanges, *static, own),
        write=_any(*exchanges, *static, own),
        # Declaring a queue that names a dead-letter exchange takes read on the queue too.
        read=_any(*exchanges, *static, own),
        # Facts the gateway records: a pool's stream events (the engine-pool surface) and the
        # streams registry's events (the streams surface).
        topic_write=_any(rf"sig\.{_SEGMENT}\..+", rf"ev\.error\.{_SEGMENT}\..+", r"probe\..+",
                         rf"ev\.ready\.{re.escape(keys.STREAM_EVENTS)}\.{_SEGMENT}",
                         rf"ev\.ready\.({'|'.join(map(re.escape, keys.REGISTRY_EVENTS))})\.[a-z0-9_-]+"),
        topic_read=".*",
    )


_STREAM_ID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def stream_publisher_grant() -> Grant:
    """A stream publisher (``controlplane.client.streams``): its request queues, the stream
    requests bound to them, and answers under reply keys, nothing else. Any publisher may
    bind any stream's requests: stream ids are made when a stream is advertised, so no
    grant made beforehand can name one publisher's streams."""
    queue = rf"{re.escape(keys.CONTROL_EXCHANGE)}\.stream-publisher\.{_STREAM_ID}"
    exchange = re.escape(keys.CONTROL_EXCHANGE)
    return Grant(
        configure=_any(queue),
        write=_any(queue, exchange),  # binding takes write on the queue; answers, on the exchange
        read=_any(queue, exchange),  # consuming, and binding from the exchange
        topic_write=_any(rf"reply\.{_SEGMENT}\.[a-z0-9]+"),
        topic_read=_any(rf"sig\.{re.escape(keys.STREAM_REQUEST)}\.{_STREAM_ID}"),
    )


# The host controller makes the other users: that takes RabbitMQ's administrator tag.
HOST_GRANT = Grant(configure=".*", write=".*", read=".*", topic_write=".*", topic_read=".*")


async def ensure_process_users(accounts: BrokerAccounts, settings: Settings) -> tuple[str, str]:
    """The gateway's and the host controller's own users; their URLs at CP_AMQP_URL's broker."""
    base = settings.amqp_url.get_secret_value()
    gateway = await accounts.ensure("gateway", settings.gateway_name, gateway_grant(settings.gateway_name), base=base)
    host = await accounts.ensure("host-controller", settings.instance_id, HOST_GRANT, tags="administrator",
                                 base=base)
    return gateway, host


def management_login(settings: Settings) -> tuple[str, str, str]:
    """The management API and an administrator's credentials (default: those of CP_AMQP_URL)."""
    admin = URL(settings.amqp_url.get_secret_value())
    user = settings.management_user or admin.user or "guest"
    password = (settings.management_password.get_secret_value() if settings.management_password
                else admin.password or "guest")
    return settings.management_url, user, password


def vhost_of(amqp_url: str) -> str:
    return unquote(URL(amqp_url).raw_path.lstrip("/")) or "/"


async def apply_policies(settings: Settings, topology: Topology) -> None:
    """The topology's queue bounds, as policies of this vhost; a broker without its management
    API keeps running unbounded, and says so in the log."""
    vhost = vhost_of(settings.amqp_url.get_secret_value())
    try:
        async with Management(*management_login(settings)) as management:
            for policy in topology.policies:
                definition = dict(policy.definition)
                if policy.name == keys.DEAD_LETTER_POLICY:
                    definition["max-length"] = settings.dead_letter_max_messages
                await management.put_policy(vhost, policy.name, policy.pattern, definition, policy.priority,
                                            policy.apply_to)
    except ManagementError as exc:
        log.warning("queue bounds not applied: the management API refused or is away", error=repr(exc))


class BrokerAccounts:
    """Creates and removes the users of one control plane (owner) in one vhost."""

    def __init__(self, management_url: str, admin_user: str, admin_password: str, container_url: str,
                 owner: str, secret: str) -> None:
        self._management = (management_url, admin_user, admin_password)
        self._container_url = URL(container_url)
        self.vhost = vhost_of(container_url)
        self.owner = owner
        self._secret = secret

    def as_settings(self) -> dict[str, Any]:
        """Settings that make another login derive the same passwords and manage the same users."""
        url, user, password = self._management
        return {"management_url": url, "management_user": user, "management_password": SecretStr(password),
                "broker_user_secret": SecretStr(self._secret), "broker_users": True}

    def delegated_env(self) -> dict[str, str]:
        """What a swarm-controller container needs to manage its bees' users as this one would."""
        url, user, password = self._management
        return {"CP_MANAGEMENT_URL": url, "CP_MANAGEMENT_USER": user, "CP_MANAGEMENT_PASSWORD": password,
                "CP_BROKER_USER_SECRET": self._secret, "CP_BROKER_USERS": "true",
                # Where bees reach the broker, without credentials: each bee gets its own.
                "CP_BEE_AMQP_URL": str(self._container_url.with_user(None))}

    @classmethod
    def from_settings(cls, settings: Settings) -> BrokerAccounts | None:
        """None when the operator chose to hand containers the broker URL as it is."""
        if not settings.broker_users:
            return None
        url, user, password = management_login(settings)
        secret = (settings.broker_user_secret.get_secret_value() if settings.broker_user_secret
                  else f"{password}/{settings.instance_id}")
        return cls(url, user, password, settings.container_amqp_url(), settings.instance_id, secret)

    def user_name(self, role: str, instance: str) -> str:
        return f"cp.{self.owner}.{keys.component_scope(role, instance)}"

    def password(self, user: str) -> str:
        return hmac.new(self._secret.encode(), f"{self.vhost}/{user}".encode(), hashlib.sha256).hexdigest()

    def url_for(self, user: str, base: str | None = None) -> str:
        """The broker as the containers reach it (or at ``base``), with this user's credentials."""
        url = URL(base) if base else self._container_url
        return str(url.with_user(user).with_password(self.password(user)))

    async def ensure(self, role: str, instance: str, grant: Grant, tags: str = "", base: str | None = None) -> str:
        """Create (or refresh) the user with exactly ``grant``; its broker URL."""
        user = self.user_name(role, instance)
        async with Management(*self._management) as management:
            await management.put_user(user, self.password(user), tags)
            await management.set_permissions(self.vhost, user, grant.configure, grant.write, grant.read)
            await management.set_topic_permissions(self.vhost, user, keys.CONTROL_EXCHANGE,
                                                   grant.topic_write, grant.topic_read)
        log.info("broker user ready", user=user, vhost=self.vhost)
        return self.url_for(user, base)

    async def remove(self, role: str, instance: str) -> None:
        """Remove the user; a failure is logged, not raised: teardown goes on without it."""
        user = self.user_name(role, instance)
        try:
            async with Management(*self._management) as management:
                await management.delete_user(user)
        except ManagementError as exc:
            log.warning("broker user not removed", user=user, error=repr(exc))
