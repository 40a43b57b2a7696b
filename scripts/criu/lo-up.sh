#!/bin/sh
# CRIU action script (installed by provisioning, named in /etc/criu/runc.conf, which runc hands to
# CRIU for every container dump and restore, podman's and docker's alike).
#
# podman restores a --network none container into a fresh network namespace whose loopback is
# down, so CRIU cannot reconnect the container's established TCP connections ("Network is
# unreachable"). Bring lo up in the restored namespace before CRIU restores the sockets.
[ "$CRTOOLS_SCRIPT_ACTION" = "setup-namespaces" ] || exit 0
[ -n "$CRTOOLS_INIT_PID" ] || exit 0
exec nsenter -t "$CRTOOLS_INIT_PID" -n ip link set lo up
