#!/usr/bin/env bash
# Makes sure an image registry answers on 127.0.0.1:5000 (REGISTRY_PORT overrides the port): the
# tests of a service update that pulls its newer image need one. Uses a registry that already
# answers; otherwise installs Debian's docker-registry (apt) when missing and starts it in the
# background on loopback only, its images in a scratch folder. The Docker engine treats a
# registry on 127.0.0.0/8 as one it may reach over plain HTTP.
set -euo pipefail

PORT="${REGISTRY_PORT:-5000}"
answering() {
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT" && printf 'GET /v2/ HTTP/1.0\r\n\r\n' >&3 && read -r -t 2 status <&3 \
    && [[ "$status" == *" 200 "* ]]) 2>/dev/null
}

answering && exit 0

if ! command -v docker-registry >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-registry: nothing answers on 127.0.0.1:$PORT and docker-registry is not installed;" \
         "run as root or install it: apt-get install docker-registry" >&2
    exit 1
  fi
  echo "ensure-registry: installing docker-registry"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
fi

# The package's install step may have started one of its own on this port: never start a second.
if ! answering; then
  DIR="$(mktemp -d "${TMPDIR:-/tmp}/registry-$PORT.XXXXXX")"
  LOG="$DIR/registry.log"
  cat > "$DIR/config.yml" <<CONFIG
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $DIR/data}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$PORT}
CONFIG
  echo "ensure-registry: starting docker-registry on 127.0.0.1:$PORT (log: $LOG)"
  setsid nohup docker-registry serve "$DIR/config.yml" >"$LOG" 2>&1 < /dev/null &
fi

deadline=$((SECONDS + 30))
until answering; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "ensure-registry: no registry answered on 127.0.0.1:$PORT within 30 s; last lines of ${LOG:-its log}:" >&2
    [ -n "${LOG:-}" ] && tail -n 20 "$LOG" >&2 || true
    exit 1
  fi
  sleep 0.2
done
echo "ensure-registry: a registry is up on 127.0.0.1:$PORT"
