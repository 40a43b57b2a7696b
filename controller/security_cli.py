"""The CLI's security commands: `stasis certs ...`, `stasis whoami`, `stasis audit`.

`certs init|issue|show` work on files only (run them where the CA key lives); `certs revoke`,
`certs revoked`, `whoami` and `audit` ask the controller.
"""

from __future__ import annotations

import datetime as dt
import os

from stasis.errors import InvalidArgument
from stasis.proto.v1 import stasis_pb2 as pb

DEFAULT_CA_DIR = "/etc/stasis/pki"


def _ident_doc(ident, path: str = "") -> dict:
    doc = {"principal": ident.principal, "kind": ident.kind, "name": ident.name, "role": ident.role,
           "serial": f"{ident.serial:x}", "not_before": ident.not_before.isoformat(),
           "not_after": ident.not_after.isoformat(), "sha256": ident.fingerprint}
    if path:
        doc["bundle"] = path
    return doc


def cmd_certs_init(args) -> int:
    from stasis.controller.cli import output
    from stasis.security.pki import Authority

    ca = Authority.init(args.dir, days=args.days)
    output(args, {"ca": os.path.join(args.dir, "ca.crt"), "not_after": ca.cert.not_valid_after_utc.isoformat()},
           f"created a stasis CA in {args.dir} (ca.key is secret: keep it off the hosts)\n"
           f"next: stasis certs issue controller controller --dir {args.dir}")
    return 0


def cmd_certs_issue(args) -> int:
    from stasis.controller.cli import output
    from stasis.security.pki import Authority

    ca = Authority(args.dir)
    path, ident = ca.issue(args.kind, args.name, role=args.role or "", out=args.out, days=args.days)
    where = {"controller": "/etc/stasis/tls/controller on the controller's machine",
             "agent": "/etc/stasis/tls/agent on that host",
             "user": "~/.config/stasis/tls for that user (or point $STASIS_TLS at it)"}[args.kind]
    output(args, _ident_doc(ident, path),
           f"issued {ident.describe()} serial {ident.serial:x}, valid until {ident.not_after:%Y-%m-%d}\n"
           f"bundle: {path}\ncopy it to {where}; issuing again into the same folder rotates it "
           f"(daemons pick it up without a restart)")
    return 0


def cmd_certs_show(args) -> int:
    from stasis.controller.cli import output
    from stasis.security.tls import read_bundle

    folder = args.bundle or args.tls
    if not folder:
        raise InvalidArgument("which bundle? stasis certs show DIR (or --tls DIR)")
    ident = read_bundle(folder).identity
    left = ident.not_after - dt.datetime.now(dt.timezone.utc)
    doc = _ident_doc(ident, folder)
    doc["expires_in_days"] = round(left.total_seconds() / 86400, 1)
    output(args, doc)
    return 0


def cmd_certs_revoke(args, client) -> int:
    from stasis.controller.cli import output, to_dict

    r = client.call("Revoke", pb.RevokeRequest(target=args.target, reason=args.reason or ""))
    output(args, to_dict(r), f"revoked {args.target}: refused by the controller now and by every agent "
                             f"at its next heartbeat")
    return 0


def cmd_certs_revoked(args, client) -> int:
    from stasis.controller.cli import output, table, to_dict

    items = client.call("ListRevocations", pb.ListRevocationsRequest()).revocations
    if args.json:
        output(args, [to_dict(r) for r in items])
    elif not items:
        print("nothing is revoked")
    else:
        table([[r.principal or "-", r.serial or "-", r.before or "-", r.reason] for r in items],
              ["PRINCIPAL", "SERIAL", "ISSUED BEFORE", "REASON"])
    return 0


def cmd_whoami(args, client) -> int:
    from stasis.controller.cli import output, to_dict

    r = client.call("WhoAmI", pb.WhoAmIRequest())
    output(args, to_dict(r), f"{r.principal} ({r.role})" + ("" if r.tls else " over plaintext (--insecure)"))
    return 0


def cmd_audit(args, client) -> int:
    from stasis.controller.cli import output, table, to_dict
    from stasis.controller.retention import parse_duration

    since = args.since or ""
    if since and "T" not in since:   # a duration back from now; else an RFC 3339 time
        since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=parse_duration(since))).isoformat()
    entries = client.call("ListAudit", pb.ListAuditRequest(since=since, principal=args.user or "",
                                                           limit=args.limit)).entries
    if args.json:
        output(args, [to_dict(e) for e in entries])
        return 0
    rows = []
    for e in reversed(entries):   # oldest first, like a log
        target = " ".join(f"{k}={v}" for k, v in sorted(e.target.items()))
        result = e.code if e.code == "OK" else f"{e.code}: {e.message[:80]}"
        rows.append([e.time, e.principal, e.method, target, result, e.job_id])
    table(rows, ["TIME", "WHO", "CALL", "TARGET", "RESULT", "JOB"])
    return 0


def add_commands(sub, common, add) -> None:
    p = add("certs", "the stasis CA: init, issue, show; revoke, revoked (through the controller)", None)
    csub = p.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    s = csub.add_parser("init", help="create the CA (ca.crt, ca.key) that every stasis identity comes from",
                        parents=[common])
    s.add_argument("--dir", default=DEFAULT_CA_DIR, help="CA folder (default %(default)s)")
    s.add_argument("--days", type=int, default=3650, help="CA lifetime in days (default %(default)s)")
    s.set_defaults(fn=cmd_certs_init, daemon=True)
    s = csub.add_parser("issue", help="issue a bundle for the controller, an agent or a user", parents=[common],
                        description="Issue a TLS bundle. Examples: 'certs issue controller controller', "
                                    "'certs issue agent host-a', 'certs issue user alice --role operator'. "
                                    "Roles: viewer (list, show), operator (+ checkpoint, restore, migrate, "
                                    "schedules), admin (+ prune, revoke, audit, memory forensics).")
    s.add_argument("kind", choices=["controller", "agent", "user"])
    s.add_argument("name", help="'controller', the agent's host name, or the user's name")
    s.add_argument("--role", choices=["viewer", "operator", "admin"], help="a user's role")
    s.add_argument("--days", type=int, help="lifetime in days (default: 365 for daemons, 90 for users)")
    s.add_argument("--dir", default=DEFAULT_CA_DIR, help="CA folder (default %(default)s)")
    s.add_argument("--out", help="bundle folder (default: DIR/controller, DIR/agents/NAME or DIR/users/NAME)")
    s.set_defaults(fn=cmd_certs_issue, daemon=True)
    s = csub.add_parser("show", help="who a bundle says you are, and until when", parents=[common])
    s.add_argument("bundle", nargs="?", help="bundle folder (default: --tls)")
    s.set_defaults(fn=cmd_certs_show, daemon=True)
    s = csub.add_parser("revoke", help="deny a user's or agent's certificates (admin)", parents=[common],
                        description="TARGET is KIND:NAME (user:alice, agent:host-a): every certificate of it "
                                    "issued until now is refused; a new one issued later works. Or a serial "
                                    "(hex) for one certificate. Agents learn it at their next heartbeat.")
    s.add_argument("target", metavar="TARGET")
    s.add_argument("--reason")
    s.set_defaults(fn=cmd_certs_revoke)
    s = csub.add_parser("revoked", help="list the deny list (admin)", parents=[common])
    s.set_defaults(fn=cmd_certs_revoked)

    add("whoami", "who the controller takes you for, and your role", cmd_whoami)
    p = add("audit", "who did what to which container and checkpoint, and how it ended (admin)", cmd_audit)
    p.add_argument("--since", metavar="TIME|DURATION", help="e.g. 1h, 2d, or 2026-11-29T10:00:00+00:00")
    p.add_argument("--user", metavar="PRINCIPAL", help="only this caller, e.g. user:alice")
    p.add_argument("--limit", type=int, default=100, help="newest N entries (default %(default)s)")
