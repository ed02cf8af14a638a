#!/usr/bin/env bash
# Makes sure a Redis server answers PING on 127.0.0.1:6379 (REDIS_PORT overrides the port): the
# shared rate-limit counter's tests need one. Uses a server that already answers; otherwise
# installs Debian's redis-server (apt) when missing and starts it in the background, on
# loopback only and keeping nothing on disk.
set -euo pipefail

PORT="${REDIS_PORT:-6379}"
pinging() {
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT" && printf 'PING\r\n' >&3 && read -r -t 2 reply <&3 && [[ "$reply" == +PONG* ]]) \
    2>/dev/null
}

pinging && exit 0

if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-redis: nothing answers on 127.0.0.1:$PORT and redis-server is not installed;" \
         "run as root or install it: apt-get install redis-server" >&2
    exit 1
  fi
  echo "ensure-redis: installing redis-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

# The package's install step may have started a server of its own on this port: never start a second.
if ! pinging; then
  if [ -w /var/log ]; then LOG=/var/log/redis-$PORT.log; else LOG="${TMPDIR:-/tmp}/redis-$PORT.log"; fi
  DIR="$(mktemp -d "${TMPDIR:-/tmp}/redis-$PORT.XXXXXX")"
  echo "ensure-redis: starting redis-server on 127.0.0.1:$PORT (log: $LOG)"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no \
    --dir "$DIR" --logfile "$LOG"
fi

deadline=$((SECONDS + 30))
until pinging; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "ensure-redis: Redis did not answer on 127.0.0.1:$PORT within 30 s; last lines of ${LOG:-its log}:" >&2
    [ -n "${LOG:-}" ] && tail -n 20 "$LOG" >&2 || true
    exit 1
  fi
  sleep 0.2
done
echo "ensure-redis: Redis is up on 127.0.0.1:$PORT"
