#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine. Uses a running one; otherwise installs
# Debian's docker.io (apt) when dockerd is missing and starts dockerd in the background.
set -euo pipefail

LOG=/var/log/dockerd.log
docker_ok() { docker info >/dev/null 2>&1; }

docker_ok && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-docker: 'docker info' fails and starting the engine needs root;" \
       "run this as root, or start dockerd (and give this user access to /var/run/docker.sock)" >&2
  exit 1
fi

if ! command -v dockerd >/dev/null; then
  echo "ensure-docker: installing docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi

# The package's install step may have started an engine already: never start a second.
if ! pgrep -x dockerd >/dev/null; then
  echo "ensure-docker: starting dockerd (log: $LOG)"
  nohup setsid dockerd >>"$LOG" 2>&1 </dev/null &
fi

deadline=$((SECONDS + 60))
until docker_ok; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "ensure-docker: the Docker engine did not answer within 60 s; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
  fi
  sleep 1
done
echo "ensure-docker: Docker engine is up"
