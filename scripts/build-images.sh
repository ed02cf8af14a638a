#!/usr/bin/env bash
# Builds the local images the default templates need; nothing is pulled from a registry.
#   controlplane-base:bookworm   Debian bookworm (minbase) with python3, made with debootstrap
#   controlplane-busybox:local   busybox only: a plain container that is not a bee
#   controlplane:local           the project in /opt/venv, from ./Dockerfile
#   controlplane-fake-engine:local  tests' stand-in for an AceStream engine, from docker/fake-engine
#   controlplane-fake-vpn:local     tests' stand-in for a Gluetun VPN container, from docker/fake-vpn
# Each is skipped when present; controlplane:local and the fakes are rebuilt only when their inputs change.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=controlplane-base:bookworm
BUSYBOX=controlplane-busybox:local
FAKE_ENGINE=controlplane-fake-engine:local
FAKE_VPN=controlplane-fake-vpn:local
PROJECT=controlplane:local
mkdir -p build
exec 9>build/.build-images.lock
flock 9

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "build-images: '$1' is needed; run as root or install it: apt-get install $1" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}

# First Debian mirror configured for apt on this machine (deb822 or one-line format).
debian_mirror() {
  local m=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(sed -E -n '/security/d; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
          /etc/apt/sources.list | head -n1)
  fi
  [ -n "$m" ] || { echo "build-images: no Debian mirror found in the apt sources" >&2; exit 1; }
  echo "$m"
}

tmp=""
cleanup() {
  if [ -n "$tmp" ] && [ -d "$tmp" ]; then
    grep -o " $tmp/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l 2>/dev/null || true
    rm -rf --one-file-system "$tmp"
  fi
}
trap cleanup EXIT

# --- controlplane-base:bookworm ------------------------------------------------------------
if have_image "$BASE"; then
  echo "build-images: $BASE present"
else
  command -v debootstrap >/dev/null || apt_install debootstrap
  [ "$(id -u)" -eq 0 ] || { echo "build-images: debootstrap needs root" >&2; exit 1; }
  mirror=$(debian_mirror)
  tmp=$(mktemp -d /var/tmp/controlplane-base.XXXXXX)
  echo "build-images: debootstrap bookworm from $mirror (about a minute; log: build/debootstrap.log)"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
         bookworm "$tmp/root" "$mirror" >build/debootstrap.log 2>&1; then
    tail -n 20 build/debootstrap.log >&2
    exit 1
  fi
  rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/*
  tar --numeric-owner -C "$tmp/root" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["bash"]' - "$BASE" >/dev/null
  cleanup; tmp=""
  echo "build-images: $BASE built"
fi

# --- controlplane-busybox:local ------------------------------------------------------------
if have_image "$BUSYBOX"; then
  echo "build-images: $BUSYBOX present"
else
  dpkg -s busybox-static >/dev/null 2>&1 || apt_install busybox-static
  bb=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1)
  tmp=$(mktemp -d /var/tmp/controlplane-busybox.XXXXXX)
  root="$tmp/root"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev}
  install -d -m 1777 "$root/tmp"
  cp "$bb" "$root/bin/busybox"
  # Same links as 'busybox --install -s', made inside the new root folder.
  for applet in $("$root/bin/busybox" --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done
  tar --numeric-owner -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' -c 'CMD ["sh"]' - "$BUSYBOX" >/dev/null
  cleanup; tmp=""
  echo "build-images: $BUSYBOX built"
fi

# --- controlplane-fake-engine:local, controlplane-fake-vpn:local ----------------------------
# Test stand-ins, each built from its folder on the base image, labelled with a hash of the base
# image and the folder's files, and rebuilt when that hash differs.
build_fake() {
  local image=$1 dir=$2 log inputs current
  log=build/docker-build-$(basename "$dir").log
  inputs=$(
    {
      docker image inspect -f '{{.Id}}' "$BASE"
      find "$dir" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 \
        | LC_ALL=C sort -z | xargs -0 -r sha256sum
    } | sha256sum | cut -d' ' -f1
  )
  current=$(docker image inspect -f '{{index .Config.Labels "controlplane.inputs"}}' "$image" 2>/dev/null || true)
  if [ "$current" = "$inputs" ]; then
    echo "build-images: $image up to date"
    return
  fi
  if ! DOCKER_BUILDKIT=0 docker build --label "controlplane.inputs=$inputs" -t "$image" "$dir" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    exit 1
  fi
  docker image prune -f --filter label=controlplane.inputs >/dev/null
  echo "build-images: $image built (log: $log)"
}
build_fake "$FAKE_ENGINE" docker/fake-engine
build_fake "$FAKE_VPN" docker/fake-vpn

# --- controlplane:local --------------------------------------------------------------------
inputs=$(
  {
    docker image inspect -f '{{.Id}}' "$BASE"
    sha256sum Dockerfile pyproject.toml requirements.lock
    find controlplane bees scenarios -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 \
      | LC_ALL=C sort -z | xargs -0 -r sha256sum
  } | sha256sum | cut -d' ' -f1
)
current=$(docker image inspect -f '{{index .Config.Labels "controlplane.inputs"}}' "$PROJECT" 2>/dev/null || true)
if [ "$current" = "$inputs" ]; then
  echo "build-images: $PROJECT up to date"
  exit 0
fi

# Wheels are built on the host (which reaches PyPI) so the image build needs no network.
python=.venv/bin/python
if [ ! -x "$python" ]; then
  "$(command -v python3.11 || command -v python3)" -m venv .venv
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "build-images: $python must be Python 3.11, the version in $BASE" >&2
  exit 1
fi
rm -rf build/wheels build/lib build/bdist.*
# The dependencies as the lock names them, each file checked against its hash; the project's own wheel beside them.
{ "$python" -m pip download -q --disable-pip-version-check --require-hashes --only-binary=:all: \
      -r requirements.lock -d build/wheels \
  && "$python" -m pip wheel -q --disable-pip-version-check --no-deps --wheel-dir build/wheels . \
  && cp requirements.lock build/wheels/; } >build/pip-wheel.log 2>&1 \
  || { tail -n 20 build/pip-wheel.log >&2; exit 1; }
if ! DOCKER_BUILDKIT=0 docker build --label "controlplane.inputs=$inputs" -t "$PROJECT" . \
       >build/docker-build.log 2>&1; then
  tail -n 20 build/docker-build.log >&2
  exit 1
fi
rm -rf build/lib build/bdist.*
# Drop what earlier builds left untagged (the previous project image and install stages).
docker image prune -f --filter label=controlplane.inputs >/dev/null
docker image prune -f --filter label=controlplane.stage=install >/dev/null
echo "build-images: $PROJECT built (log: build/docker-build.log)"
