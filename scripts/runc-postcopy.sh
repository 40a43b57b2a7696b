#!/bin/bash
# stasis: podman's runc, with post-copy (lazy pages) and dump notices for the containers the agent asks.
#
# podman 4.3 has no lazy-pages options, so provisioning names this script as podman's "runc"
# (containers.conf [engine.runtimes]). For every other call it is runc itself (exec, same pid).
# The agent asks per container, by writing a request file named after the container id:
#   REQ/ID.dump     PORT   checkpoint: CRIU keeps the memory and serves it from 127.0.0.1:PORT
#                          (runc.conf says `address 127.0.0.1`); the images are complete once
#                          REQ/ID.ready holds a byte; REQ/ID.runc names runc's pid (to abort).
#   REQ/ID.notify   0      checkpoint (stop-and-copy migration): run runc as usual, then write its
#                          exit status to REQ/ID.dumped: the images are complete the moment it
#                          appears, before podman's own export has even begun.
#   REQ/ID.restore  PORT   restore: start CRIU's lazy-pages daemon, fetching from 127.0.0.1:PORT
#                          (the agent's authenticated relay to the source), then restore lazily;
#                          REQ/ID.daemon names the daemon's pid, REQ/ID.lazy.log is its log.
REAL=@RUNC@
REQ=/run/stasis/lazy

# A request is used once, and only within two minutes of being made: one an agent left behind
# (killed mid-migration) must never turn a later checkpoint of the same container into a lazy one.
fresh() { [ -f "$1" ] && [ -n "$(find "$1" -mmin -2 2>/dev/null)" ]; }

args=("$@")
id=${args[-1]}
[[ $id =~ ^[0-9a-f]{64}$ ]] || exec "$REAL" "$@"
for i in "${!args[@]}"; do
    case ${args[$i]} in
    checkpoint)
        if ! fresh "$REQ/$id.dump" && fresh "$REQ/$id.notify"; then
            rm -f "$REQ/$id.notify"
            "$REAL" "$@"
            rc=$?
            echo "$rc" > "$REQ/$id.dumped.tmp" && mv "$REQ/$id.dumped.tmp" "$REQ/$id.dumped"
            exit "$rc"
        fi
        fresh "$REQ/$id.dump" || break
        read -r port < "$REQ/$id.dump"
        rm -f "$REQ/$id.dump"
        [[ $port =~ ^[0-9]{1,5}$ ]] || { echo "stasis runc: bad post-copy request for $id" >&2; exit 1; }
        exec 9>>"$REQ/$id.ready"
        echo $$ > "$REQ/$id.runc"
        exec "$REAL" "${args[@]:0:i+1}" --lazy-pages --page-server "127.0.0.1:$port" --status-fd 9 \
            "${args[@]:i+1}"
        ;;
    restore)
        fresh "$REQ/$id.restore" || break
        read -r port < "$REQ/$id.restore"
        rm -f "$REQ/$id.restore"
        [[ $port =~ ^[0-9]{1,5}$ ]] || { echo "stasis runc: bad post-copy request for $id" >&2; exit 1; }
        img="" work=""
        for j in "${!args[@]}"; do
            case ${args[$j]} in
            --image-path) img=${args[j+1]} ;;
            --work-path) work=${args[j+1]} ;;
            esac
        done
        [ -d "$img" ] && [ -d "$work" ] || { echo "stasis runc: restore without image and work paths" >&2; exit 1; }
        # The daemon and the restore meet at WORK/lazy-pages.socket.
        setsid criu lazy-pages --page-server --address 127.0.0.1 --port "$port" -D "$img" -W "$work" \
            -o "$REQ/$id.lazy.log" </dev/null >/dev/null 2>&1 &
        echo $! > "$REQ/$id.daemon"
        for _ in $(seq 1 500); do
            [ -S "$work/lazy-pages.socket" ] && break
            kill -0 $! 2>/dev/null || { echo "stasis runc: CRIU's lazy-pages daemon failed (see $REQ/$id.lazy.log)" >&2; exit 1; }
            sleep 0.01
        done
        exec "$REAL" "${args[@]:0:i+1}" --lazy-pages "${args[@]:i+1}"
        ;;
    esac
done
exec "$REAL" "$@"
