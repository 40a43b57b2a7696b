#!/bin/bash
# stasis: podman's runc, with post-copy (lazy pages) and pages set aside for the containers the agent asks.
# stasis-runc-wrapper: 4   (the agent checks this line before it asks for pages aside or placed)
#
# podman 4.3 has no lazy-pages options, so provisioning names this script as podman's "runc"
# (containers.conf [engine.runtimes]). For every other call it is runc itself (exec, same pid).
# The agent asks per container, by writing a request file named after the container id (either
# checkpoint request first creates REQ/ID.started, the moment runc is started: the container still
# runs until CRIU freezes it, so downtime is counted from there):
#   REQ/ID.dump     PORT   checkpoint: CRIU keeps the memory and serves it from 127.0.0.1:PORT
#                          (runc.conf says `address 127.0.0.1`); the images are complete once
#                          REQ/ID.ready holds a byte; REQ/ID.runc names runc's pid (to abort).
#   REQ/ID.aside    0      checkpoint (stop-and-copy migration): run runc as usual; once it has
#                          succeeded, move CRIU's pages-*.img out of the image folder into
#                          IMAGES/../stasis-pages, so that podman's own export (single-threaded)
#                          stays small. The agent ships the pages itself, and puts them back
#                          before a local restore. Then runc's exit status goes to REQ/ID.dumped:
#                          the agent starts its archive with the pages while podman finishes.
#   REQ/ID.pages    DIR    restore (stop-and-copy migration): CRIU's pages-*.img are in DIR, not in
#                          the imported archive (the agent wrote them there as they arrived): link
#                          them into the image folder first.
#   REQ/ID.restore  PORT   restore: start CRIU's lazy-pages daemon, fetching from 127.0.0.1:PORT
#                          (the agent's authenticated relay to the source), then restore lazily;
#                          REQ/ID.daemon names the daemon's pid, REQ/ID.lazy.log is its log.
#   REQ/ID.mark     0      restore: once runc has returned, write its exit status to REQ/ID.restored.
#                          CRIU's action script (scripts/criu/actions.sh) creates REQ/ID.resumed the
#                          moment the processes resume: where downtime ends.
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
        if ! fresh "$REQ/$id.dump" && fresh "$REQ/$id.aside"; then
            rm -f "$REQ/$id.aside"
            : > "$REQ/$id.started"
            img=""
            for j in "${!args[@]}"; do
                [ "${args[$j]}" = --image-path ] && img=${args[j+1]}
            done
            "$REAL" "$@"
            rc=$?
            # A rename within podman's own folder: instant, whatever the size. The dump stands even if
            # it fails: the pages left in place are exported by podman, and the agent ships them too.
            if [ "$rc" = 0 ] && [ -d "$img" ]; then
                mkdir -p -m 0700 "$img/../stasis-pages" &&
                    find "$img" -maxdepth 1 -name 'pages-*.img' -exec mv -t "$img/../stasis-pages" {} + ||
                    echo "stasis runc: could not set the pages of $id aside" >&2
            fi
            echo "$rc" > "$REQ/$id.dumped.tmp" && mv "$REQ/$id.dumped.tmp" "$REQ/$id.dumped"
            exit "$rc"
        fi
        fresh "$REQ/$id.dump" || break
        read -r port < "$REQ/$id.dump"
        rm -f "$REQ/$id.dump"
        [[ $port =~ ^[0-9]{1,5}$ ]] || { echo "stasis runc: bad post-copy request for $id" >&2; exit 1; }
        exec 9>>"$REQ/$id.ready"
        echo $$ > "$REQ/$id.runc"
        : > "$REQ/$id.started"
        exec "$REAL" "${args[@]:0:i+1}" --lazy-pages --page-server "127.0.0.1:$port" --status-fd 9 \
            "${args[@]:i+1}"
        ;;
    restore)
        img="" work="" lazy=()
        for j in "${!args[@]}"; do
            case ${args[$j]} in
            --image-path) img=${args[j+1]} ;;
            --work-path) work=${args[j+1]} ;;
            esac
        done
        if fresh "$REQ/$id.pages"; then
            read -r from < "$REQ/$id.pages"
            rm -f "$REQ/$id.pages"
            [[ $from == /* ]] && [ -d "$from" ] && [ -d "$img" ] ||
                { echo "stasis runc: bad pages request for $id" >&2; exit 1; }
            # A hard link (the agent writes them on the mount of podman's storage); a copy if that
            # fails. Not a symbolic link: CRIU opens the images from within the container's root.
            for page in "$from"/pages-*.img; do
                [ -f "$page" ] || continue
                ln "$page" "$img/" 2>/dev/null || cp "$page" "$img/" ||
                    { echo "stasis runc: could not place $page for CRIU" >&2; exit 1; }
            done
        fi
        if fresh "$REQ/$id.restore"; then
            read -r port < "$REQ/$id.restore"
            rm -f "$REQ/$id.restore"
            [[ $port =~ ^[0-9]{1,5}$ ]] || { echo "stasis runc: bad post-copy request for $id" >&2; exit 1; }
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
            lazy=(--lazy-pages)
        fi
        fresh "$REQ/$id.mark" || exec "$REAL" "${args[@]:0:i+1}" "${lazy[@]}" "${args[@]:i+1}"
        # CRIU's action script marks the moment the processes resume (REQ/ID.resumed), while the
        # request stands (the agent removes it); this marks runc's return, and says how it went.
        "$REAL" "${args[@]:0:i+1}" "${lazy[@]}" "${args[@]:i+1}"
        rc=$?
        echo "$rc" > "$REQ/$id.restored.tmp" && mv "$REQ/$id.restored.tmp" "$REQ/$id.restored"
        exit "$rc"
        ;;
    esac
done
exec "$REAL" "$@"
