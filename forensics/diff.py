"""What changed between two checkpoints: processes, open files, sockets, dumped memory, filesystem.

Processes are matched by pid (in the container's pid namespace, which a leave-running checkpoint
keeps); a pid whose comm or argv changed is reported as changed, not as a new process. Sockets are
matched by what they are (protocol, addresses, ports, state), not by inode, so a socket that moved
from LISTEN to CLOSE shows as one removed and one added.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

PROCESS_FIELDS = ("ppid", "comm", "argv", "state", "uid", "gid", "cap_eff")


def _socket_key(k: dict) -> str:
    if k["family"] == "unix":
        return f"unix {k['type']} {k['state']} {k['address'] or '-'}"
    return f"{k['proto']} {k['type']} {k['state']} {k['local']}:{k['local_port']} -> {k['remote']}:{k['remote_port']}"


def _fd_view(f: dict) -> dict:
    return {"fd": f["fd"], "type": f["type"], "path": f["path"]}


def diff(a, b) -> dict[str, Any]:
    """The differences from checkpoint `a` to checkpoint `b` (both forensics.checkpoint.Checkpoint)."""
    sa, sb = a.summary(), b.summary()
    pa = {p["pid"]: p for p in a.processes(cmdline=True)}
    pb = {p["pid"]: p for p in b.processes(cmdline=True)}

    def brief(p: dict) -> dict:
        return {"pid": p["pid"], "ppid": p["ppid"], "comm": p["comm"], "argv": p.get("argv")}

    changed = []
    for pid in sorted(pa.keys() & pb.keys()):
        fields = [{"field": f, "before": pa[pid].get(f), "after": pb[pid].get(f)}
                  for f in PROCESS_FIELDS if pa[pid].get(f) != pb[pid].get(f)]
        if fields:
            changed.append({"pid": pid, "comm": pb[pid]["comm"], "changes": fields})
    processes = {"added": [brief(pb[p]) for p in sorted(pb.keys() - pa.keys())],
                 "removed": [brief(pa[p]) for p in sorted(pa.keys() - pb.keys())], "changed": changed}

    fa = {d["pid"]: d for d in a.files()}
    fb = {d["pid"]: d for d in b.files()}
    files = []
    for pid in sorted(fa.keys() & fb.keys()):
        da = {f["fd"]: _fd_view(f) for f in fa[pid]["fds"]}
        db = {f["fd"]: _fd_view(f) for f in fb[pid]["fds"]}
        entry: dict[str, Any] = {
            "pid": pid, "comm": fb[pid]["comm"],
            "added": [db[fd] for fd in sorted(db.keys() - da.keys())],
            "removed": [da[fd] for fd in sorted(da.keys() - db.keys())],
            "changed": [{"fd": fd, "before": da[fd], "after": db[fd]} for fd in sorted(da.keys() & db.keys())
                        if (da[fd]["type"], da[fd]["path"]) != (db[fd]["type"], db[fd]["path"])]}
        for k in ("cwd", "root", "exe"):
            if fa[pid][k] != fb[pid][k]:
                entry[k] = {"before": fa[pid][k], "after": fb[pid][k]}
        if entry["added"] or entry["removed"] or entry["changed"] or len(entry) > 5:
            files.append(entry)

    ka = Counter(_socket_key(k) for k in a.sockets())
    kb = Counter(_socket_key(k) for k in b.sockets())
    sockets = {"added": sorted((kb - ka).elements()), "removed": sorted((ka - kb).elements())}

    ma, mb = a.memory_pages(), b.memory_pages()
    memory = [{"pid": pid, "comm": (pb.get(pid) or pa.get(pid))["comm"], "pages_before": ma.get(pid),
               "pages_after": mb.get(pid), "delta": mb.get(pid, 0) - ma.get(pid, 0)}
              for pid in sorted(ma.keys() | mb.keys())]

    xa, xb = a.fs(against_image=False), b.fs(against_image=False)
    ca = {f["path"]: f for f in xa["changed"]}
    cb = {f["path"]: f for f in xb["changed"]}
    fs = {"added": [cb[p] for p in sorted(cb.keys() - ca.keys())],
          "removed": [ca[p] for p in sorted(ca.keys() - cb.keys())],
          "changed": [{"path": p, "before": ca[p], "after": cb[p]} for p in sorted(ca.keys() & cb.keys())
                      if ca[p] != cb[p]],
          "deleted_added": sorted(set(xb["deleted"]) - set(xa["deleted"])),
          "deleted_removed": sorted(set(xa["deleted"]) - set(xb["deleted"]))}

    def side(s: dict) -> dict:
        return {"checkpoint": s["checkpoint"], "created": s["created"], "host": s["host"],
                "container": s["container"]["name"], "container_id": s["container"]["id"],
                "processes": s["processes"], "memory_pages": s["sizes"]["memory_pages"]}

    same = any((processes["added"], processes["removed"], changed, files, sockets["added"], sockets["removed"],
                *(fs[k] for k in fs), *(m["delta"] for m in memory)))
    return {"a": side(sa), "b": side(sb), "same_container": sa["container"]["id"] == sb["container"]["id"],
            "identical": not same, "processes": processes, "files": files, "sockets": sockets, "memory": memory,
            "fs": fs}
