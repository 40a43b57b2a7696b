"""How much data waited in the checkpoint's socket queues: sizes and counts only, never the bytes.

A pure view over decoded images (the caller hands in img(name, expect) -> Image | None and
names(regex) -> sorted matching image names). CRIU records two kinds of queues:
  sk-queues.img        receive queues of unix (and packet) sockets: one entry per queued skb
                       (a datagram, for dgram sockets), keyed by the socket's files.img id (id_for),
                       its bytes stored right behind the entry;
  tcp-stream-INO.img   one per TCP connection dumped with --tcp-established, named by the socket's
                       inode in hex: the receive and send queue lengths (and their bytes behind).
"""

from __future__ import annotations

import re
from typing import Callable

from stasis.forensics.images import ImageError

SCM_RIGHTS = 1
TCP_STREAM = re.compile(r"tcp-stream-([0-9a-f]{1,16})\.img")


def queued(img: Callable, names: Callable) -> dict:
    """{"by_id": {files.img id: q}, "tcp_by_inode": {inode: t}} (int keys; strings once in JSON).

    q = {"recv_queue_bytes", "recv_queue_packets", "fds_in_flight"} (fds passed with SCM_RIGHTS);
    t = {"id" (files.img id, None if files.img lacks the socket), "recv_queue_bytes", "send_queue_bytes"
    (sent but unacknowledged plus unsent), "send_unsent_bytes" (None if CRIU did not record it)}.
    """
    by_id: dict[int, dict] = {}
    sq = img("sk-queues.img", "sk-queues")
    for e in sq.entries if sq is not None else ():
        q = by_id.setdefault(e.id_for, {"recv_queue_bytes": 0, "recv_queue_packets": 0, "fds_in_flight": 0})
        q["recv_queue_bytes"] += e.length
        q["recv_queue_packets"] += 1
        q["fds_in_flight"] += sum(len(s.rights) for s in e.scm if s.type == SCM_RIGHTS)
    tcp: dict[int, dict] = {}
    stream_names = names(TCP_STREAM.pattern)
    if stream_names:
        files = img("files.img", "files")
        ids = {f.isk.ino: f.id for f in files.entries if f.HasField("isk")} if files is not None else {}
        for name in stream_names:
            image = img(name, "tcp-stream")
            if image is None:
                continue
            if len(image.entries) != 1:
                raise ImageError(f"{name} is corrupt: {len(image.entries)} entries, CRIU writes one")
            e, ino = image.entries[0], int(TCP_STREAM.fullmatch(name).group(1), 16)
            tcp[ino] = {"id": ids.get(ino), "recv_queue_bytes": e.inq_len, "send_queue_bytes": e.outq_len,
                        "send_unsent_bytes": e.unsq_len if e.HasField("unsq_len") else None}
    return {"by_id": by_id, "tcp_by_inode": tcp}
