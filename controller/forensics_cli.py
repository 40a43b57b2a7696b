"""The CLI's forensics commands: `stasis inspect` and `stasis grep`, straight from the repository.

Like `stasis repo ...` they need no controller: they open the repository (--repo or
$STASIS_REPOSITORY, password from --password-file or $STASIS_PASSWORD), fetch the checkpoint's
archive with every chunk verified into a private temporary folder, and read it without restoring
or running anything from it (see stasis.forensics.checkpoint).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from stasis.errors import IntegrityError, InvalidArgument, StasisError

VIEWS = ("ps", "files", "sockets", "mounts", "maps", "stats", "fs")


@contextlib.contextmanager
def open_checkpoint(args) -> Iterator[Any]:
    """The checkpoint args.checkpoint of the repository the arguments name, unpacked; removed afterwards."""
    from stasis.forensics.checkpoint import Checkpoint
    from stasis.storage.keys import read_password
    from stasis.storage.repository import Repository

    if not args.repo:
        raise InvalidArgument("name the repository: --repo file:///path or s3://bucket/prefix, "
                              "or set STASIS_REPOSITORY")
    if args.workdir and not os.path.isdir(args.workdir):
        raise InvalidArgument(f"--workdir {args.workdir}: no such folder")
    repo = Repository.open(args.repo, read_password(args.password_file, prompt=True))
    ckpt = _decoding(lambda: Checkpoint.open(repo, args.checkpoint, workdir=args.workdir))
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
    for view, fn in (("files", ckpt.files), ("sockets", ckpt.sockets), ("mounts", ckpt.mounts),
                     ("maps", ckpt.maps), ("stats", ckpt.stats), ("fs", ckpt.fs)):
        if view in want:
            doc[view] = fn()
    return doc


def cmd_inspect(args) -> int:
    from stasis.controller.cli import emit_json

    with open_checkpoint(args) as ckpt:
        doc = _decoding(lambda: inspect_doc(ckpt, args))
    if args.json:
        emit_json(doc)
    else:
        print("\n".join(render_inspect(doc)))
    return 0


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
            if k["family"] == "unix":
                rows.append(["unix", k["type"], k["state"], k["address"] or "-", f"peer {k['peer'] or '-'}", who])
            else:
                rows.append([k["proto"], k["type"], k["state"], f"{k['local']}:{k['local_port']}",
                             f"{k['remote']}:{k['remote_port']}", who])
        out += ["", "sockets", *_table(rows, ["PROTO", "TYPE", "STATE", "LOCAL", "REMOTE", "PID:FD"])]
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
        rows = [["changed", f["type"], _human(f["size"]) if f["type"] == "file" else "", f["path"]]
                for f in fs["changed"]]
        rows += [["deleted", "", "", p] for p in fs["deleted"]]
        rows += [["REFUSED", "", "", p] for p in fs["refused_deletions"]]
        out += ["", "filesystem changes", *_table(rows, ["CHANGE", "TYPE", "SIZE", "PATH"])]
    return out


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# ---------------------------------------------------------------------------- arguments

def _repo_args(p) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT_ID", help="checkpoint id or a unique prefix")
    p.add_argument("--repo", metavar="REPO_URL", default=os.environ.get("STASIS_REPOSITORY"),
                   help="file:///path or s3://bucket/prefix (default: $STASIS_REPOSITORY)")
    p.add_argument("--password-file", help="file holding the password (default: $STASIS_PASSWORD)")
    p.add_argument("--workdir", help="where the archive is unpacked, in a private folder removed afterwards "
                                     "(default: $TMPDIR or /tmp)")
    p.set_defaults(daemon=True)   # no controller


def add_commands(sub, common, add) -> None:
    p = add("inspect", "examine a checkpoint without restoring it: summary, processes, files, sockets, mounts, "
                       "memory maps, CRIU statistics, filesystem changes (from the repository, no controller)",
            cmd_inspect)
    _repo_args(p)
    for view, text in (("ps", "process tree: pid, ppid, comm, state, uid/gid, capabilities"),
                       ("files", "open files per process (fd, type, path), cwd, root, exe"),
                       ("sockets", "unix and inet sockets: addresses, ports, state, holders"),
                       ("mounts", "the container's mounts"), ("maps", "memory mappings with permissions"),
                       ("stats", "CRIU dump statistics"),
                       ("fs", "filesystem changes: changed files with sizes, deleted files")):
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
