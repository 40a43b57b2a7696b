"""The CLI's forensics commands (inspect, grep, dump-file, dump-memory, diff, export, import),
straight from the repository.

Like `stasis repo ...` they need no controller: they open the repository (--repo or
$STASIS_REPOSITORY, password from --password-file or $STASIS_PASSWORD) and read the checkpoint's
archive in place, fetching and verifying only the chunks a question needs, without restoring or
running anything from it (see stasis.forensics.checkpoint).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from stasis.errors import IntegrityError, InvalidArgument, StasisError

VIEWS = ("ps", "files", "sockets", "namespaces", "mounts", "maps", "stats", "fs")


def open_repository(args):
    """The repository --repo names (password from --password-file or $STASIS_PASSWORD)."""
    from stasis.storage.keys import read_password
    from stasis.storage.repository import Repository

    if not args.repo:
        raise InvalidArgument("name the repository: --repo file:///path or s3://bucket/prefix, "
                              "or set STASIS_REPOSITORY")
    if getattr(args, "workdir", None) and not os.path.isdir(args.workdir):
        raise InvalidArgument(f"--workdir {args.workdir}: no such folder")
    return Repository.open(args.repo, read_password(args.password_file, prompt=True))


@contextlib.contextmanager
def open_checkpoint(args, checkpoint_id: str | None = None, repo=None) -> Iterator[Any]:
    """The checkpoint args.checkpoint of the repository the arguments name, unpacked; removed afterwards."""
    from stasis.forensics.checkpoint import Checkpoint

    repo = repo or open_repository(args)
    ident = checkpoint_id or args.checkpoint
    ckpt = _decoding(lambda: Checkpoint.open(repo, ident))
    try:
        yield ckpt
    finally:
        ckpt.close()


def _decoding(fn):
    """Run fn; a bug tripped by hostile input becomes one line, never a traceback."""
    try:
        return fn()
    except StasisError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeError,
            AttributeError, RecursionError, MemoryError) as e:
        raise IntegrityError(f"the checkpoint cannot be decoded: {type(e).__name__}: {e}") from None


def inspect_doc(ckpt, args) -> dict:
    """The JSON document `stasis inspect` prints for these arguments."""
    want = {v for v in VIEWS if getattr(args, v, False) or args.all}
    if args.env or args.cmdline:
        want.add("ps")
    doc: dict[str, Any] = {"summary": ckpt.summary()}
    if "ps" in want:
        doc["processes"] = ckpt.processes(cmdline=args.cmdline or args.all, env=args.env or args.all)
    for view, fn in (("files", ckpt.files), ("sockets", ckpt.sockets), ("namespaces", ckpt.namespaces),
                     ("mounts", ckpt.mounts),
                     ("maps", ckpt.maps), ("stats", ckpt.stats), ("fs", ckpt.fs)):
        if view in want:
            doc[view] = fn()
    return doc


def _show(args, doc: dict, render) -> int:
    """One JSON document with --json, else the lines `render` makes of it."""
    from stasis.controller.cli import emit_json

    if args.json:
        emit_json(doc)
    else:
        print("\n".join(render(doc)))
    return 0


def cmd_inspect(args) -> int:
    with open_checkpoint(args) as ckpt:
        doc = _decoding(lambda: inspect_doc(ckpt, args))
    return _show(args, doc, render_inspect)


def cmd_grep(args) -> int:
    from stasis.controller.cli import emit_json

    with open_checkpoint(args) as ckpt:
        doc = _decoding(lambda: ckpt.grep(args.pattern, regex=args.regex, pid=args.pid, context=args.context,
                                          limit=args.max))
    doc["checkpoint"] = ckpt.manifest.id if ckpt.manifest else ""
    if args.json:
        emit_json(doc)
        return 0
    for h in doc["hits"]:
        print(f"pid {h['pid']} ({h['comm']}) at {h['vaddr']} in {h['mapping']} {h['perms']}: {h['match']!r}")
        for line in h["hexdump"]:
            print(f"  {line}")
    more = " (stopped at --max; there are more)" if doc["truncated"] else ""
    print(f"{len(doc['hits'])} hits{more}")
    return 0 if doc["hits"] else 1


def _number(text: str, what: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not a number (decimal, or hex as 0x...)") from None


def cmd_dump_file(args) -> int:
    from stasis.controller.cli import emit_json
    from stasis.forensics.export_import import safe_output

    with safe_output(args.out, args.force) as (f, _), open_checkpoint(args) as ckpt:
        doc = _decoding(lambda: ckpt.dump_file(args.path, f))
    doc["out"] = args.out
    if args.json:
        emit_json(doc)
    else:
        print(f"wrote {doc['path']} of checkpoint {doc['checkpoint']} to {args.out}: {doc['size']} bytes, "
              f"mode {doc['mode']} uid {doc['uid']} gid {doc['gid']} in the container, sha256 {doc['sha256']}")
    return 0


def cmd_dump_memory(args) -> int:
    from stasis.controller.cli import emit_json
    from stasis.forensics.export_import import safe_output

    addr, length = _number(args.addr, "--addr"), _number(args.len, "--len")
    with safe_output(args.out, args.force) as (f, _), open_checkpoint(args) as ckpt:
        doc = _decoding(lambda: ckpt.dump_memory(args.pid, addr, length, f))
    doc["out"] = args.out
    if args.json:
        emit_json(doc)
        return 0
    where = ", ".join(f"{m['mapping']} {m['perms']}" for m in doc["mappings"]) or "no mapping"
    print(f"wrote {doc['length']} bytes of pid {doc['pid']} ({doc['comm']}) from {doc['addr']} to {args.out} "
          f"({where}): {doc['dumped_bytes']} bytes from the checkpoint, sha256 {doc['sha256']}")
    for m in doc["missing"]:
        inside = f" in {m['mapping']}" if m["mapping"] else ""
        print(f"  zeros  {m['start']}-{m['end']} ({m['length']} bytes): {m['why']}{inside}")
    return 0


def cmd_diff(args) -> int:
    from stasis.forensics.diff import diff

    repo = open_repository(args)
    with open_checkpoint(args, args.checkpoint_a, repo) as a, open_checkpoint(args, args.checkpoint_b, repo) as b:
        doc = _decoding(lambda: diff(a, b))
    return _show(args, doc, render_diff)


def cmd_export(args) -> int:
    from stasis.controller.cli import emit_json
    from stasis.forensics.export_import import export_checkpoint

    repo = open_repository(args)
    doc = export_checkpoint(repo, args.checkpoint, args.out, args.force)
    if args.json:
        emit_json(doc)
    else:
        print(f"exported checkpoint {doc['checkpoint']} ({doc['container']}, image {doc['image']}) to {args.out}: "
              f"{_human(doc['size'])}, sha256 {doc['sha256']}")
        print(f"restore it with: podman container restore --import {args.out} --name NEW_NAME "
              f"(the image must be on that host)")
    return 0


def cmd_import(args) -> int:
    from stasis.controller.cli import emit_json
    from stasis.forensics.export_import import import_archive

    repo = open_repository(args)
    m, report = _decoding(lambda: import_archive(repo, args.archive, args.host, args.workdir))
    doc = {"checkpoint": m.id, "host": m.host, "container": {"name": m.container.name, "id": m.container.id,
                                                             "image": m.container.image},
           "size": m.checkpoint.size, "new_bytes": m.new_bytes, "members": report["members"],
           "processes": report["processes"], "deleted_files": len(report["deleted"]),
           "decompressed": report["decompressed"]}
    if args.json:
        emit_json(doc)
    else:
        print(f"imported {args.archive} as checkpoint {m.id} of {m.container.name} ({m.container.id[:12]}) on "
              f"{m.host}: {report['members']} members checked, {report['processes']} processes, "
              f"{_human(m.checkpoint.size)} ({_human(m.new_bytes)} new)")
    return 0


# ---------------------------------------------------------------------------- plain text

def _table(rows: list[list[Any]], headers: list[str]) -> list[str]:
    cells = [[str(c) if c is not None else "-" for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _human(n: int) -> str:
    from stasis.controller.cli import human_bytes

    return human_bytes(n)


def render_inspect(doc: dict) -> list[str]:
    s, out = doc["summary"], []
    c, sz = s["container"], s["sizes"]
    out += [f"checkpoint   {s['checkpoint'] or '-'} taken {s['created'] or '-'} on {s['host'] or '-'}",
            f"container    {c['name']} ({c['id'][:12]}), image {c['image']}, hostname {c['hostname'] or '-'}",
            f"runtime      {s['runtime'] or '-'} {s['runtime_version']}; CRIU {s['criu_version'] or '-'}",
            f"processes    {s['processes']}",
            f"memory       {sz['memory_pages']} pages ({_human(sz['memory_bytes'])}) dumped",
            f"filesystem   {s['fs_changes']['changed']} changed, {s['fs_changes']['deleted']} deleted "
            f"({_human(sz['rootfs_diff_bytes'])} of rootfs-diff.tar)",
            f"archive      {_human(sz['archive_bytes'])}"]
    if "processes" in doc:
        procs = doc["processes"]
        rows = [[p["pid"], p["ppid"], p["comm"], p["state"], p["uid"], p["gid"], p["cap_eff"]] for p in procs]
        out += ["", "processes", *_table(rows, ["PID", "PPID", "COMM", "STATE", "UID", "GID", "CAP_EFF"])]
        for p in procs:
            if p.get("argv") is not None:
                out.append(f"  {p['pid']} argv: {' '.join(_quote(a) for a in p['argv'])}")
            for e in p.get("env") or ():
                out.append(f"  {p['pid']} env:  {e}")
    if "files" in doc:
        out += ["", "files"]
        rows = []
        for p in doc["files"]:
            rows += [[p["pid"], "cwd", "", p["cwd"]], [p["pid"], "root", "", p["root"]],
                     [p["pid"], "exe", "", p["exe"]]]
            rows += [[p["pid"], f["fd"], f["type"], f["path"]] for f in p["fds"]]
        out += _table(rows, ["PID", "FD", "TYPE", "PATH"])
    if "sockets" in doc:
        rows = []
        for k in doc["sockets"]:
            who = ",".join(f"{h['pid']}:{h['fd']}" for h in k["held_by"]) or "-"
            queues = [k["recv_queue_bytes"], k["send_queue_bytes"]]
            if k["family"] == "unix":
                rows.append(["unix", k["type"], k["state"], *queues, k["address"] or "-", f"peer {k['peer'] or '-'}",
                             who])
            else:
                rows.append([k["proto"], k["type"], k["state"], *queues, f"{k['local']}:{k['local_port']}",
                             f"{k['remote']}:{k['remote_port']}", who])
        out += ["", "sockets", *_table(rows, ["PROTO", "TYPE", "STATE", "RECV-Q", "SEND-Q", "LOCAL", "REMOTE",
                                              "PID:FD"])]
    if "namespaces" in doc:
        rows = []
        for kind, spaces in doc["namespaces"]["namespaces"].items():
            for ns in spaces:
                rows.append([kind, ns["id"], "own" if ns["own"] else "host" if ns["own"] is False else "?",
                             ",".join(map(str, ns["pids"])), _ns_details(kind, ns)])
        out += ["", "namespaces", *_table(rows, ["KIND", "ID", "OWNER", "PIDS", "RECORDED"])]
    if "mounts" in doc:
        rows = [[m["mountpoint"], m["fstype"], m["source"], m["options"][:60]] for m in doc["mounts"]]
        out += ["", "mounts", *_table(rows, ["MOUNTPOINT", "TYPE", "SOURCE", "OPTIONS"])]
    if "maps" in doc:
        for p in doc["maps"]:
            rows = [[f"{m['start']}-{m['end']}", m["perms"], m["offset"], _human(m["dumped"]), m["mapping"]]
                    for m in p["maps"]]
            out += ["", f"maps of {p['pid']} ({p['comm']})", *_table(rows, ["RANGE", "PERMS", "OFFSET", "DUMPED",
                                                                            "MAPPING"])]
    if "stats" in doc:
        out += ["", "CRIU dump statistics"] + [f"  {k:<24} {v}" for k, v in doc["stats"].items()]
    if "fs" in doc:
        fs = doc["fs"]
        rows = [[f.get("change") or "changed", f["type"], _human(f["size"]) if f["type"] == "file" else "", f["path"]]
                for f in fs["changed"]]
        rows += [["deleted", "", "", p] for p in fs["deleted"]]
        rows += [["REFUSED", "", "", p] for p in fs["refused_deletions"]]
        out += ["", "filesystem changes", *_table(rows, ["CHANGE", "TYPE", "SIZE", "PATH"])]
    return out


def _ns_details(kind: str, ns: dict) -> str:
    """A line of what CRIU recorded about one namespace."""
    if kind == "uts" and "nodename" in ns:
        return f"hostname {ns['nodename']}, domain {ns.get('domainname', '')}"
    if kind == "net" and "interfaces" in ns:
        return "; ".join(f"{i['name']} {' '.join(i.get('addresses') or [])}".strip() for i in ns["interfaces"])
    if kind == "mnt" and "mounts" in ns:
        return f"{ns['mounts']} mounts"
    if kind == "user" and ns.get("uid_map"):
        return f"uid map {ns['uid_map']}"
    return ""


def render_diff(doc: dict) -> list[str]:
    a, b = doc["a"], doc["b"]
    out = [f"a  {a['checkpoint']} taken {a['created']} on {a['host']}: {a['container']}, {a['processes']} processes",
           f"b  {b['checkpoint']} taken {b['created']} on {b['host']}: {b['container']}, {b['processes']} processes"]
    if not doc["same_container"]:
        out.append("   (checkpoints of different containers)")
    if doc["identical"]:
        return [*out, "no differences"]
    p = doc["processes"]

    def argv(x: dict) -> str:
        return " ".join(_quote(v) for v in x["argv"]) if x.get("argv") is not None else x["comm"]

    if p["added"] or p["removed"] or p["changed"]:
        out.append("processes")
        out += [f"  + {x['pid']} (parent {x['ppid']}) {x['comm']}: {argv(x)}" for x in p["added"]]
        out += [f"  - {x['pid']} (parent {x['ppid']}) {x['comm']}: {argv(x)}" for x in p["removed"]]
        for x in p["changed"]:
            out += [f"  ~ {x['pid']} {c['field']}: {c['before']!r} -> {c['after']!r}" for c in x["changes"]]
    if doc["files"]:
        out.append("open files")
        for f in doc["files"]:
            out += [f"  + {f['pid']} ({f['comm']}) fd {d['fd']} {d['type']} {d['path']}" for d in f["added"]]
            out += [f"  - {f['pid']} ({f['comm']}) fd {d['fd']} {d['type']} {d['path']}" for d in f["removed"]]
            out += [f"  ~ {f['pid']} ({f['comm']}) fd {d['fd']} {d['before']['path']} -> {d['after']['path']}"
                    for d in f["changed"]]
            out += [f"  ~ {f['pid']} ({f['comm']}) {k} {f[k]['before']} -> {f[k]['after']}"
                    for k in ("cwd", "root", "exe") if k in f]
    if doc["sockets"]["added"] or doc["sockets"]["removed"]:
        out.append("sockets")
        out += [f"  + {k}" for k in doc["sockets"]["added"]] + [f"  - {k}" for k in doc["sockets"]["removed"]]
    rows = [[m["pid"], m["comm"], "-" if m["pages_before"] is None else m["pages_before"],
             "-" if m["pages_after"] is None else m["pages_after"], f"{m['delta']:+d}"] for m in doc["memory"]]
    out += ["memory pages dumped", *("  " + r for r in _table(rows, ["PID", "COMM", "A", "B", "DELTA"]))]
    fs = doc["fs"]
    if any(fs.values()):
        out.append("filesystem changes")
        out += [f"  + {f['path']} ({f['type']}, {f['size']} bytes)" for f in fs["added"]]
        out += [f"  - {f['path']} (changed in a, not in b)" for f in fs["removed"]]
        out += [f"  ~ {f['path']} ({f['before']['size']} -> {f['after']['size']} bytes, mode {f['before']['mode']} "
                f"-> {f['after']['mode']})" for f in fs["changed"]]
        out += [f"  + deleted {p}" for p in fs["deleted_added"]] + [f"  - deleted {p}" for p in fs["deleted_removed"]]
    return out


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# ---------------------------------------------------------------------------- arguments

def _repo_args(p, positional: bool = True) -> None:
    if positional:
        p.add_argument("checkpoint", metavar="CHECKPOINT_ID", help="checkpoint id or a unique prefix")
    p.add_argument("--repo", metavar="REPO_URL", default=os.environ.get("STASIS_REPOSITORY"),
                   help="file:///path or s3://bucket/prefix (default: $STASIS_REPOSITORY)")
    p.add_argument("--password-file", help="file holding the password (default: $STASIS_PASSWORD)")
    p.set_defaults(daemon=True)   # no controller


def add_commands(sub, common, add) -> None:
    p = add("inspect", "examine a checkpoint without restoring it: summary, processes, files, sockets, mounts, "
                       "memory maps, CRIU statistics, filesystem changes (from the repository, no controller)",
            cmd_inspect)
    _repo_args(p)
    for view, text in (("ps", "process tree: pid, ppid, comm, state, uid/gid, capabilities"),
                       ("files", "open files per process (fd, type, path), cwd, root, exe"),
                       ("sockets", "unix and inet sockets: addresses, ports, state, bytes queued, holders"),
                       ("namespaces", "namespaces: which processes share each, the container's own or the "
                                      "host's, hostname, interfaces, mounts, ipc limits"),
                       ("mounts", "the container's mounts"), ("maps", "memory mappings with permissions"),
                       ("stats", "CRIU dump statistics"),
                       ("fs", "filesystem changes: files added or modified (when the repository holds the image), "
                              "with sizes; deleted files")):
        p.add_argument(f"--{view}", action="store_true", help=text)
    p.add_argument("--env", action="store_true", help="each process's environment, read from its dumped memory")
    p.add_argument("--cmdline", action="store_true", help="each process's argv, read from its dumped memory")
    p.add_argument("--all", action="store_true", help="every view")

    p = add("grep", "search a checkpoint's process memory: pid, address, mapping and a hexdump per hit "
                    "(from the repository, no controller)", cmd_grep)
    _repo_args(p)
    p.add_argument("pattern", metavar="PATTERN", help="bytes to find (UTF-8), or a Python regex with --regex")
    p.add_argument("--regex", action="store_true", help="PATTERN is a regular expression")
    p.add_argument("--pid", type=int, help="only this process")
    p.add_argument("--context", type=int, default=64, help="bytes of hexdump either side (default %(default)s)")
    p.add_argument("--max", type=int, default=100, help="stop after this many hits (default %(default)s)")

    p = add("dump-file", "copy one file the container changed out of a checkpoint (its rootfs-diff.tar), without "
                         "restoring it; only regular files, never over an existing OUT without --force",
            cmd_dump_file, epilog="example: stasis dump-file 3f2a9c01 /tmp/payload.sh -o payload.sh  "
                                  "(list the changed files with: stasis inspect ID --fs)")
    _repo_args(p)
    p.add_argument("path", metavar="PATH", help="absolute path in the container, e.g. /tmp/payload.sh")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="file to write (mode 0600; an existing OUT, even a symlink, is never followed)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (a symlink itself is replaced)")

    p = add("dump-memory", "copy a span of a process's dumped memory out of a checkpoint; pages the checkpoint "
                           "lacks are written as zeros and listed", cmd_dump_memory,
            epilog="example: stasis dump-memory 3f2a9c01 --pid 1 --addr 0x55d0c0de0000 --len 4096 -o heap.bin  "
                   "(find addresses with: stasis inspect ID --maps, or stasis grep)")
    _repo_args(p)
    p.add_argument("--pid", type=int, required=True, help="the process (pid inside the container)")
    p.add_argument("--addr", required=True, help="start address, hex (0x...) or decimal")
    p.add_argument("--len", required=True, help="bytes to copy, at most 1 GiB (hex or decimal)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="file to write (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (a symlink itself is replaced)")

    p = add("diff", "what changed between two checkpoints: processes (comm, argv), open files, sockets, memory "
                    "pages dumped per process, filesystem changes", cmd_diff,
            epilog="example: stasis diff 3f2a9c01 9b01d2e4 --json  (A is the earlier one)")
    p.add_argument("checkpoint_a", metavar="CHECKPOINT_A", help="the earlier checkpoint (id or unique prefix)")
    p.add_argument("checkpoint_b", metavar="CHECKPOINT_B", help="the later checkpoint")
    _repo_args(p, positional=False)

    p = add("export", "write a checkpoint's archive out of the repository, every chunk verified, in podman's own "
                      "format: 'podman container restore --import OUT' accepts it", cmd_export,
            epilog="example: stasis export 3f2a9c01 -o web.tar && podman container restore --import web.tar "
                   "--name web-copy")
    _repo_args(p)
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="the tar file to write (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (a symlink itself is replaced)")

    p = add("import", "store a podman (podman container checkpoint --export) or kubelet checkpoint archive in the "
                      "repository as a new checkpoint, after checking every member; then inspect, grep, diff, "
                      "export or restore it", cmd_import,
            epilog="example: stasis import web.tar --host host-a  (zstd and gzip archives are accepted)")
    p.add_argument("archive", metavar="ARCHIVE", help="the checkpoint archive (.tar, .tar.gz or .tar.zst)")
    p.add_argument("--host", default="imported",
                   help="the host the checkpoint is recorded as taken on (default %(default)s)")
    _repo_args(p, positional=False)
    p.add_argument("--workdir", help="where a compressed archive is decompressed before it is checked and stored, "
                                     "in a private folder removed afterwards (default: $TMPDIR or /tmp)")
