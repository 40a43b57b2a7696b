#!/bin/sh
# CRIU action script (installed by provisioning, named in /etc/criu/runc.conf, which runc hands to
# CRIU for every container dump and restore, podman's and docker's alike). One script for every
# duty: CRIU starts it for each action of each run.
case "$CRTOOLS_SCRIPT_ACTION" in
setup-namespaces)
    # podman restores a --network none container into a fresh network namespace whose loopback is
    # down, so CRIU cannot reconnect the container's established TCP connections ("Network is
    # unreachable"). Bring lo up in the restored namespace before CRIU restores the sockets.
    [ -n "$CRTOOLS_INIT_PID" ] || exit 0
    exec nsenter -t "$CRTOOLS_INIT_PID" -n ip link set lo up
    ;;
post-resume)
    # The restored processes run from here on: where a migration's downtime ends, before runc and
    # the engine finish their own work. Tell the agent that asked (its REQ/ID.mark request to the
    # runc wrapper), by the container id in the restored first process's cgroup.
    [ -n "$CRTOOLS_INIT_PID" ] || exit 0
    id=$(grep -o -m1 '[0-9a-f]\{64\}' "/proc/$CRTOOLS_INIT_PID/cgroup") || exit 0
    [ -f "/run/stasis/lazy/$id.mark" ] && : > "/run/stasis/lazy/$id.resumed"
    exit 0
    ;;
esac
exit 0
