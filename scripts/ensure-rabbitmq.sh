#!/usr/bin/env bash
# Makes sure a RabbitMQ broker runs on 127.0.0.1:5672 with the management plugin (port 15672).
# Uses a broker that is already running; otherwise installs (apt) and starts Debian's rabbitmq-server.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pinging() { command -v rabbitmq-diagnostics >/dev/null && timeout 15 rabbitmq-diagnostics -q ping >/dev/null 2>&1; }
node_process() { pgrep -f 'beam.*-s rabbit boot' >/dev/null 2>&1; }

enable_management() {
  listening 15672 && return 0
  if ! pinging; then
    echo "ensure-rabbitmq: a broker answers on 5672 but is not managed here; cannot enable rabbitmq_management" >&2
    return 0
  fi
  rabbitmq-plugins -q enable rabbitmq_management >/dev/null
  for _ in $(seq 30); do listening 15672 && return 0; sleep 1; done
  echo "ensure-rabbitmq: management plugin enabled but 15672 is not listening yet" >&2
}

if listening 5672 || pinging; then
  enable_management
  exit 0
fi

if ! command -v rabbitmq-server >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-rabbitmq: RabbitMQ is not running and rabbitmq-server is not installed;" \
         "run as root or install it: apt-get install rabbitmq-server" >&2
    exit 1
  fi
  echo "ensure-rabbitmq: installing rabbitmq-server"
  # The broker installed here listens on loopback only, management UI included; written before
  # the package starts its node (the package ships no rabbitmq.conf of its own).
  mkdir -p /etc/rabbitmq
  [ -e /etc/rabbitmq/rabbitmq.conf ] || printf '%s\n' "listeners.tcp.default = 127.0.0.1:5672" \
    "management.tcp.ip = 127.0.0.1" > /etc/rabbitmq/rabbitmq.conf
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi

# The package's install step or another caller may already have started a node: never start a second.
if ! node_process && ! pinging; then
  echo "ensure-rabbitmq: starting rabbitmq-server"
  rabbitmq-server -detached
fi

deadline=$((SECONDS + 60))
until pinging && listening 5672; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "ensure-rabbitmq: RabbitMQ did not come up within 60 s; see /var/log/rabbitmq/" >&2
    exit 1
  fi
  sleep 1
done
enable_management
echo "ensure-rabbitmq: RabbitMQ is up on 127.0.0.1:5672"
