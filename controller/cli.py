"""The `stasis` command line.

Client commands talk to the controller (--controller or STASIS_CONTROLLER); `repo` commands work on
a repository directly, with no controller. Every command takes --json and then prints exactly one
JSON document on stdout. Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, Callable

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from stasis import __version__
from stasis.controller import forensics_cli, security_cli
from stasis.errors import FailedPrecondition, InvalidArgument, StasisError, from_rpc_error
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
from stasis.security.pki import CONTROLLER_SERVER_NAME
from stasis.security.tls import Transport, transport_from_args

DEFAULT_CONTROLLER = "127.0.0.1:7070"
EXIT_FAILED, EXIT_USAGE = 1, 2


class Client:
    def __init__(self, address: str, transport: Callable[[], Transport]):
        self.address = address
        self._transport = transport
        self._stub: pb_grpc.ControllerStub | None = None

    @property
    def stub(self) -> pb_grpc.ControllerStub:
        # Connect on first use: a usage error is reported before any certificate is read.
        if self._stub is None:
            self._stub = pb_grpc.ControllerStub(self._transport().channel(self.address, CONTROLLER_SERVER_NAME))
        return self._stub

    def call(self, method: str, request, timeout: float = 30.0):
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"controller at {self.address}") from None

    def stream(self, method: str, request, on_event: Callable[[pb.JobEvent], None]) -> pb.Job:
        job = None
        try:
            for event in getattr(self.stub, method)(request):
                job = event.job
                on_event(event)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"controller at {self.address}") from None
        if job is None:
            raise StasisError("the controller ended the job stream without a result")
        return job


def to_dict(message) -> dict[str, Any]:
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _int64_as_numbers(message, doc)


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _int64_as_numbers(message, doc: dict[str, Any]) -> dict[str, Any]:
    # The proto3 JSON mapping writes 64-bit integers as strings; scripts want numbers (sizes, bytes).
    for field in message.DESCRIPTOR.fields:
        if field.name not in doc:
            continue
        if field.type in _INT64 and not field.message_type:
            value = doc[field.name]
            doc[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type and not field.message_type.GetOptions().map_entry:
            value = getattr(message, field.name)
            if field.is_repeated:
                doc[field.name] = [_int64_as_numbers(m, d) for m, d in zip(value, doc[field.name], strict=True)]
            else:
                doc[field.name] = _int64_as_numbers(value, doc[field.name])
    return doc


def emit_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def output(args, doc: Any, text: str | None = None) -> None:
    """One JSON document with --json; otherwise `text`, or the document as `key: value` lines."""
    if args.json:
        emit_json(doc)
    elif text is not None:
        print(text)
    else:
        for key, value in doc.items():
            print(f"{key}: {value}")


def table(rows: list[list[str]], headers: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, pad_edge=False, show_edge=False)
    for h in headers:
        t.add_column(h, overflow="fold")
    for r in rows:
        t.add_row(*r)
    Console(width=200 if not sys.stdout.isatty() else None).print(t)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def split_target(target: str) -> tuple[str, str]:
    host, sep, name = target.partition("/")
    if not sep or not host or not name:
        raise InvalidArgument(f"{target!r} is not HOST/CONTAINER (for example host-a/web)")
    return host, name


# ---------------------------------------------------------------------------- job commands

class Progress:
    """Phase changes and byte progress of a job, on stderr (stdout stays for the result)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.phase = ""
        self.tty = sys.stderr.isatty()

    def __call__(self, event: pb.JobEvent) -> None:
        if self.quiet:
            return
        p = event.progress
        if event.job.phase and event.job.phase != self.phase:
            self.phase = event.job.phase
            self._line(f"[{event.job.id}] {self.phase}…")
        if p.bytes_total and self.tty:
            sys.stderr.write(f"\r  {p.phase}: {human_bytes(p.bytes_done)} / {human_bytes(p.bytes_total)}"
                             f" ({100 * p.bytes_done // max(p.bytes_total, 1)}%)   ")
            sys.stderr.flush()

    def _line(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def job_doc(job: pb.Job) -> dict[str, Any]:
    doc = to_dict(job)
    doc["timings"] = {t.name: t.seconds for t in job.timings}
    return doc


def finish_job(args, job: pb.Job, success: Callable[[pb.Job], None]) -> int:
    if args.json:
        emit_json(job_doc(job))
    elif job.state == "succeeded":
        success(job)
    if job.state != "succeeded":
        print(f"stasis: error: {job.kind} job {job.id} {job.state.replace('_', ' ')}: {job.error}",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def phases_line(job: pb.Job) -> str:
    top = [t for t in job.timings if "." not in t.name]
    return ", ".join(f"{t.name} {t.seconds:.2f}s" for t in top)


def cmd_checkpoint(args, client: Client) -> int:
    host, name = split_target(args.target)
    job = client.stream("Checkpoint", pb.CheckpointRequest(
        request_id=args.request_id or "", host=host, container=name, leave_running=args.leave_running),
        Progress(args.json))

    def ok(j: pb.Job) -> None:
        print(j.result["checkpoint_id"])
        print(f"checkpointed {args.target} ({human_bytes(int(j.result.get('size_bytes', 0)))}; "
              f"{phases_line(j)})", file=sys.stderr)
    return finish_job(args, job, ok)


def cmd_restore(args, client: Client) -> int:
    job = client.stream("Restore", pb.RestoreRequest(
        request_id=args.request_id or "", checkpoint_id=args.checkpoint, host=args.to, name=args.name or ""),
        Progress(args.json))

    def ok(j: pb.Job) -> None:
        print(f"restored checkpoint {j.result['checkpoint_id']} as {j.result['host']}/{j.result['container']} "
              f"({phases_line(j)})")
    return finish_job(args, job, ok)


def cmd_migrate(args, client: Client) -> int:
    host, name = split_target(args.target)
    transfer = "repository" if args.via_repository else "direct"
    if args.post_copy and args.via_repository:
        raise InvalidArgument("--post-copy moves memory from agent to agent; it cannot go --via-repository")
    job = client.stream("Migrate", pb.MigrateRequest(
        request_id=args.request_id or "", host=host, container=name, to=args.to, transfer=transfer,
        ignore_volumes=args.ignore_volumes, post_copy=args.post_copy),
        Progress(args.json))

    def ok(j: pb.Job) -> None:
        kept = (f", checkpoint {j.result['checkpoint_id']} kept in the repository" if transfer == "repository"
                else ", agent to agent" + (", post-copy" if args.post_copy else ""))
        print(f"migrated {name} from {host} to {args.to} (job {j.id}{kept})")
        print(f"downtime {j.downtime_seconds:.2f} s; {phases_line(j)}")
        if not j.result.get("cleanup", "done").startswith("done"):
            print(f"warning: source clean-up {j.result['cleanup']}", file=sys.stderr)
    return finish_job(args, job, ok)


def cmd_job(args, client: Client) -> int:
    if args.watch:
        job = client.stream("WatchJob", pb.GetJobRequest(id=args.id), Progress(args.json))
    else:
        job = client.call("GetJob", pb.GetJobRequest(id=args.id))
    if args.json:
        emit_json(job_doc(job))
        return 0 if job.state in ("succeeded", "running") else EXIT_FAILED
    print(f"job {job.id}: {job.kind} {job.state} (phase {job.phase})")
    for k, v in sorted(job.params.items()):
        print(f"  {k}: {v}")
    for k, v in sorted(job.result.items()):
        print(f"  result.{k}: {v}")
    if job.downtime_seconds:
        print(f"  downtime: {job.downtime_seconds:.3f} s")
    for t in job.timings:
        print(f"  {t.name}: {t.seconds:.3f} s")
    if job.error:
        print(f"  error: {job.error}")
    return 0 if job.state in ("succeeded", "running") else EXIT_FAILED


def cmd_jobs(args, client: Client) -> int:
    jobs = client.call("ListJobs", pb.ListJobsRequest(limit=args.limit)).jobs
    if args.json:
        emit_json([job_doc(j) for j in jobs])
        return 0
    table([[j.id, j.kind, j.state, j.phase, j.created, f"{j.downtime_seconds:.2f}s" if j.downtime_seconds else "",
            j.error[:80]] for j in jobs], ["JOB", "KIND", "STATE", "PHASE", "CREATED", "DOWNTIME", "ERROR"])
    return 0


# ---------------------------------------------------------------------------- queries

def cmd_hosts(args, client: Client) -> int:
    hosts = client.call("ListHosts", pb.ListHostsRequest()).hosts
    if args.json:
        emit_json([to_dict(h) for h in hosts])
        return 0
    table([[h.name, h.state, h.address, f"{h.info.runtime} {h.info.runtime_version}",
            h.info.criu_version, h.info.kernel, h.last_seen] for h in hosts],
          ["HOST", "STATE", "ADDRESS", "RUNTIME", "CRIU", "KERNEL", "LAST SEEN"])
    return 0


def cmd_ps(args, client: Client) -> int:
    request = pb.ControllerListContainersRequest(host=args.host or "", all=args.all)
    items = client.call("ListContainers", request).containers
    if args.json:
        emit_json([to_dict(c) for c in items])
        return 0
    table([[c.host, c.name, c.id[:12], c.image, c.state, c.created] for c in items],
          ["HOST", "NAME", "ID", "IMAGE", "STATE", "CREATED"])
    return 0


def cmd_checkpoints(args, client: Client) -> int:
    if args.id:
        output(args, checkpoint_doc(client.call("GetCheckpoint", pb.GetCheckpointRequest(id=args.id))))
        return 0
    items = client.call("ListCheckpoints", pb.ListCheckpointsRequest(container=args.container or "",
                                                                     host=args.host or "")).checkpoints
    if args.json:
        emit_json([checkpoint_doc(c) for c in items])
        return 0
    table([[c.id, c.created, c.host, c.container_name, human_bytes(c.size_bytes),
            "yes" if c.leave_running else "no", _seconds(_timing(c, "frozen"))] for c in items],
          ["ID", "CREATED", "HOST", "CONTAINER", "SIZE", "LEFT RUNNING", "FROZEN"])
    return 0


def _timing(c: pb.CheckpointSummary, name: str) -> float | None:
    return next((t.seconds for t in c.timings if t.name == name), None)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def checkpoint_doc(c: pb.CheckpointSummary) -> dict[str, Any]:
    doc = to_dict(c)
    doc["timings"] = {t.name: t.seconds for t in c.timings}
    return doc


# ---------------------------------------------------------------------------- schedules and backups

def _policy(args) -> pb.RetentionPolicy:
    from stasis.controller.retention import parse_duration

    return pb.RetentionPolicy(keep_last=args.keep_last or 0, keep_hourly=args.keep_hourly or 0,
                              keep_daily=args.keep_daily or 0, keep_weekly=args.keep_weekly or 0,
                              keep_monthly=args.keep_monthly or 0,
                              keep_within_seconds=parse_duration(args.keep_within) if args.keep_within else 0)


def _labels(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--label {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def cmd_schedule(args, client: Client) -> int:
    from stasis.controller.retention import parse_duration

    action = args.schedule_command
    if action == "create":
        spec = pb.Schedule(name=args.name, selector=args.selector or "", labels=_labels(args.label),
                           every_seconds=parse_duration(args.every) if args.every else 0, cron=args.cron or "",
                           retention=_policy(args), pre_hook=args.pre_hook or "", post_hook=args.post_hook or "",
                           hook_timeout_seconds=parse_duration(args.hook_timeout), hook_on_error=args.hook_on_error,
                           paused=args.paused)
        result = client.call("CreateSchedule", spec)
    elif action == "list":
        items = client.call("ListSchedules", pb.ListSchedulesRequest()).schedules
        if args.json:
            emit_json([to_dict(s) for s in items])
        else:
            table([[s.name, s.selector or ",".join(f"{k}={v}" for k, v in s.labels.items()),
                    s.cron or f"every {s.every_seconds:g}s", "paused" if s.paused else "active", s.last_run,
                    s.next_run, s.last_result] for s in items],
                  ["NAME", "SELECTS", "WHEN", "STATE", "LAST RUN", "NEXT RUN", "LAST RESULT"])
        return 0
    elif action == "run":
        ids = client.call("RunSchedule", pb.ScheduleName(name=args.name)).job_ids
        if args.json:
            emit_json({"jobs": list(ids)})
        else:
            print("\n".join(ids) if ids else "no container matches the selector")
        return 0 if ids else EXIT_FAILED
    elif action == "delete":
        client.call("DeleteSchedule", pb.ScheduleName(name=args.name))
        output(args, {"deleted": args.name}, f"deleted schedule {args.name}")
        return 0
    elif action in ("pause", "resume"):
        result = client.call("PauseSchedule", pb.PauseScheduleRequest(name=args.name, paused=action == "pause"))
    else:
        result = client.call("GetSchedule", pb.ScheduleName(name=args.name))
    output(args, to_dict(result))
    return 0


def cmd_backups(args, client: Client) -> int:
    items = client.call("ListCheckpoints", pb.ListCheckpointsRequest(
        container=args.container or "", schedule=args.schedule or "")).checkpoints
    if args.json:
        emit_json([checkpoint_doc(c) for c in items])
        return 0
    table([[c.created, c.id, c.host, c.container_name, c.tags.get("schedule", "-"), human_bytes(c.size_bytes),
            human_bytes(c.new_bytes), _seconds(_timing(c, "frozen"))] for c in items],
          ["TIME", "ID", "HOST", "CONTAINER", "SCHEDULE", "SIZE", "NEW", "FROZEN"])
    return 0


def cmd_forget(args, client: Client) -> int:
    reply = client.call("Forget", pb.ForgetRequest(schedule=args.schedule or "", container=args.container or "",
                                                   policy=_policy(args), dry_run=args.dry_run, prune=args.prune),
                        timeout=600)
    if args.json:
        emit_json({"kept": list(reply.kept), "forgotten": list(reply.forgotten), "reasons": dict(reply.reasons),
                   "bytes_freed": reply.bytes_freed, "dry_run": args.dry_run})
        return 0
    verb = "would forget" if args.dry_run else "forgot"
    for ident in reply.kept:
        print(f"keep   {ident}  ({reply.reasons.get(ident, '')})")
    for ident in reply.forgotten:
        print(f"forget {ident}")
    print(f"{verb} {len(reply.forgotten)}, kept {len(reply.kept)}"
          + (f"; prune freed {human_bytes(reply.bytes_freed)}" if reply.bytes_freed else ""))
    return 0


# ---------------------------------------------------------------------------- repository, no controller

def _password(args, prompt: bool = False, confirm: bool = False) -> str | None:
    from stasis.storage.keys import read_password

    return read_password(getattr(args, "password_file", None), prompt=prompt, confirm=confirm)


def _open_repo(args):
    from stasis.storage.repository import Repository

    return Repository.open(args.url, _password(args, prompt=True))


def cmd_repo_init(args) -> int:
    from stasis.storage.repository import Repository

    password = None if args.no_encryption else _password(args, prompt=True, confirm=True)
    repo = Repository.init(args.url, password, encrypt=not args.no_encryption)
    if args.json:
        emit_json({"url": repo.url, "id": repo.config.id, "encryption": repo.config.encryption})
    else:
        print(f"created repository {repo.config.id[:8]} at {repo.url} "
              f"({'encrypted, ' + repo.config.encryption if repo.encrypted else 'NOT encrypted'})")
        if repo.encrypted:
            print("keep the password safe: without it the checkpoints cannot be read", file=sys.stderr)
    return 0


def cmd_repo_checkpoints(args) -> int:
    from stasis.proto.convert import checkpoint_pb

    repo = _open_repo(args)
    items = []
    for ident in repo.checkpoint_ids():
        try:
            items.append(checkpoint_pb(repo.read_manifest(ident)))
        except StasisError as exc:   # one damaged manifest must not hide the others
            print(f"stasis: warning: skipping checkpoint {ident}: {exc.message}", file=sys.stderr)
    items.sort(key=lambda c: c.created)
    if args.json:
        emit_json([checkpoint_doc(c) for c in items])
    else:
        table([[c.id, c.created, c.host, c.container_name, human_bytes(c.size_bytes)] for c in items],
              ["ID", "CREATED", "HOST", "CONTAINER", "SIZE"])
    return 0


def cmd_repo_info(args) -> int:
    from stasis.storage import maintenance

    doc = maintenance.info(_open_repo(args))
    if args.json:
        emit_json(doc)
        return 0
    print(f"repository   {doc['url']} (id {doc['id'][:8]}, format version {doc['format_version']})")
    enc = f"{doc['encryption']} ({doc['keys']} keys)" if doc["encrypted"] else "NONE: checkpoints are in plaintext"
    print(f"encryption   {enc}")
    print(f"chunker      {doc['chunker']}; compression {doc['compression']}; packs of {human_bytes(doc['pack_size'])}")
    print(f"checkpoints  {doc['checkpoints']}; {doc['chunks']} unique chunks in {doc['packs']} packs")
    print(f"sizes        logical {human_bytes(doc['logical_bytes'])}, unique {human_bytes(doc['unique_bytes'])}, "
          f"stored {human_bytes(doc['stored_bytes'])}")
    if doc["total_ratio"]:
        print(f"ratios       dedup {doc['dedup_ratio']}x, compression {doc['compression_ratio']}x, "
              f"total {doc['total_ratio']}x")
    return 0


def cmd_repo_stats(args) -> int:
    from stasis.storage import maintenance

    doc = maintenance.stats(_open_repo(args), args.checkpoint)
    if args.json:
        emit_json(doc)
    else:
        print(f"checkpoint {doc['id']} of {doc['container']} ({doc['created']})")
        print(f"  logical {human_bytes(doc['logical_bytes'])} in {doc['chunks']} chunks "
              f"({doc['unique_chunks']} distinct, {human_bytes(doc['unique_bytes'])})")
        print(f"  stored  {human_bytes(doc['stored_bytes'])} after compression")
        print(f"  new     {human_bytes(doc['new_bytes'])} in {doc['new_chunks']} chunks no earlier checkpoint had "
              f"({human_bytes(doc['new_stored_bytes'])} stored)")
    return 0


def cmd_repo_check(args) -> int:
    from stasis.storage import maintenance

    subset = 1.0
    if args.subset:
        try:
            subset = float(args.subset.rstrip("%")) / 100
            assert 0 < subset <= 1
        except (ValueError, AssertionError):
            raise InvalidArgument(f"--subset {args.subset!r}: give a percentage such as 10%") from None
    progress = None
    if not args.json and sys.stderr.isatty():
        def progress(done: int, total: int) -> None:
            sys.stderr.write(f"\r  read {done}/{total} packs")
            sys.stderr.flush()
    report = maintenance.check(_open_repo(args), read_data=args.read_data or bool(args.subset),
                               subset=subset, progress=progress)
    if args.json:
        emit_json(report.to_json())
    else:
        if progress:
            sys.stderr.write("\n")
        for problem in report.problems:
            print(f"error: {problem}")
        print(f"checked {report.checkpoints} checkpoints, {report.packs} packs"
              f"{f', read {report.packs_read}' if report.packs_read else ''}: "
              f"{'no problems' if report.ok else f'{len(report.problems)} problems'}")
        if report.damaged_checkpoints:
            print(f"damaged checkpoints: {', '.join(sorted(report.damaged_checkpoints))}")
        if report.unreferenced_packs:
            print(f"{report.unreferenced_packs} packs are unreferenced ('stasis repo prune' removes them)")
    return 0 if report.ok else EXIT_FAILED


def cmd_repo_prune(args) -> int:
    from stasis.storage import maintenance

    doc = maintenance.prune(_open_repo(args), dry_run=args.dry_run, wait=args.wait)
    if args.json:
        emit_json(doc)
    else:
        verb = "would free" if args.dry_run else "freed"
        print(f"{verb} {human_bytes(doc['bytes_freed'])}: {doc['packs_deleted']} packs deleted, "
              f"{doc['packs_repacked']} repacked; {doc['checkpoints']} checkpoints keep {doc['used_chunks']} chunks")
    return 0


def cmd_repo_forget(args) -> int:
    repo = _open_repo(args)
    gone = [repo.remove_checkpoint(c) for c in args.checkpoints]
    if args.json:
        emit_json({"forgotten": gone})
    else:
        print(f"forgot {len(gone)} checkpoints; run 'stasis repo prune' to free their space")
    return 0


def cmd_repo_key(args) -> int:
    from stasis.storage.keys import read_password

    repo = _open_repo(args)
    if args.key_command == "add":
        new = read_password(args.new_password_file, env="STASIS_NEW_PASSWORD")
        if not new:
            raise InvalidArgument("give the new password with --new-password-file or STASIS_NEW_PASSWORD")
        key_id = repo.add_key(_password(args), new)
        output(args, {"added": key_id}, f"added key {key_id}")
    elif args.key_command == "remove":
        repo.remove_key(args.id)
        output(args, {"removed": args.id}, f"removed key {args.id}")
    else:
        ids = repo.key_ids()
        output(args, ids, "\n".join(ids))
    return 0


# ---------------------------------------------------------------------------- daemons

def cmd_controller_serve(args) -> int:
    from stasis import logs
    from stasis.controller.server import serve
    from stasis.controller.service import ControllerService
    from stasis.controller.store import Store
    from stasis.storage.repository import Repository, RepositoryMissing

    logs.configure()
    password = _password(args)
    try:
        repo = Repository.open(args.repo, password)
    except RepositoryMissing:
        if not password and not args.no_encryption:
            raise FailedPrecondition(f"no repository at {args.repo} yet: set STASIS_PASSWORD (or --password-file) "
                                     f"to create an encrypted one, or pass --no-encryption") from None
        repo = Repository.init(args.repo, password, encrypt=not args.no_encryption)
    transport = _daemon_transport(args, "controller", "controller")
    service = ControllerService(Store(args.state), repo, heartbeat_seconds=args.heartbeat, transport=transport)
    return _run_daemon(serve(service, args.listen))


def cmd_agent_serve(args) -> int:
    from stasis import logs
    from stasis.agent.server import serve
    from stasis.agent.service import AgentService

    logs.configure()
    if os.geteuid() != 0:
        raise StasisError("the agent must run as root: CRIU needs it to dump and restore processes")
    from stasis.security.provenance import Signer, Verifier
    from stasis.security.revocation import DenyList

    transport = _daemon_transport(args, "agent", args.host_name)
    runtime = _runtime(args)
    work_dir = args.work_dir or f"/var/lib/stasis/agent/{args.host_name}"
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    # The controller's deny list as last heard, so a restarted agent still refuses what it refused.
    deny = DenyList(path=os.path.join(work_dir, "revocations.json"))
    signer = Signer(args.tls) if transport.secure else None
    verifier = Verifier(transport.ca_certs, deny, args.allow_unsigned) if transport.secure else None
    service = AgentService(args.host_name, runtime, work_dir, args.repo or "", _password(args),
                           signer=signer, verifier=verifier, deny=deny, transport=transport)
    return _run_daemon(serve(service, args.listen, args.controller, args.advertise, transport, args.bulk_listen))


def _daemon_transport(args, kind: str, name: str) -> Transport:
    transport = transport_from_args(args.tls, args.insecure, f"the {kind}")
    ident = transport.identity
    if ident is not None and (ident.kind, ident.name) != (kind, name):
        raise FailedPrecondition(f"the bundle in {args.tls} is {ident.principal}'s, not {kind}:{name}'s: "
                                 f"issue one with 'stasis certs issue {kind} {name}'")
    return transport


def _runtime(args):
    """podman or docker; `auto` picks the one engine present and refuses to guess between two."""
    import shutil

    from stasis.agent.docker import DockerRuntime, engine_socket_exists
    from stasis.agent.podman import PodmanRuntime

    docker_host = args.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    choice = args.runtime
    if choice == "auto":
        found = [n for n, ok in (("podman", shutil.which("podman")), ("docker", engine_socket_exists(docker_host)))
                 if ok]
        if len(found) != 1:
            raise InvalidArgument(f"found {' and '.join(found) or 'no container engine'}: choose one with "
                                  f"--runtime podman|docker")
        choice = found[0]
    if choice == "podman":
        return PodmanRuntime()
    runtime = DockerRuntime(docker_host)
    runtime.require_experimental()
    return runtime


def _run_daemon(coro) -> int:
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    return 0


# ---------------------------------------------------------------------------- parser

def _common(defaults: bool) -> argparse.ArgumentParser:
    # Subcommands repeat the global options with suppressed defaults, so `stasis --json ps` and
    # `stasis ps --json` both work and neither resets the other.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", default=False if defaults else argparse.SUPPRESS,
                   help="print one JSON document on stdout")
    p.add_argument("--controller",
                   default=os.environ.get("STASIS_CONTROLLER", DEFAULT_CONTROLLER) if defaults else argparse.SUPPRESS,
                   help=f"controller address (default: $STASIS_CONTROLLER or {DEFAULT_CONTROLLER})")
    p.add_argument("--tls", metavar="DIR",
                   default=os.environ.get("STASIS_TLS") or None if defaults else argparse.SUPPRESS,
                   help="TLS bundle (ca.crt, tls.crt, tls.key) from 'stasis certs issue' (default: $STASIS_TLS, "
                        "else ~/.config/stasis/tls for commands, /etc/stasis/tls/KIND for daemons)")
    p.add_argument("--insecure", action="store_true", default=False if defaults else argparse.SUPPRESS,
                   help="no TLS and no authentication: plaintext, loopback addresses only (not advised)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common(defaults=False)
    parser = argparse.ArgumentParser(
        prog="stasis", parents=[_common(defaults=True)],
        description="Checkpoint running containers (CRIU via podman) and restore them on any host.",
        epilog="examples:\n  stasis hosts\n  stasis checkpoint host-a/web --leave-running\n"
               "  stasis restore 3f2a --to host-b --name web2\n  stasis migrate host-a/web --to host-b",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"stasis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, fn, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common], **kw)
        p.set_defaults(fn=fn)
        return p

    p = add("controller", "run the controller daemon", None)
    csub = p.add_subparsers(dest="sub", required=True, metavar="serve")
    s = csub.add_parser("serve", help="serve the controller API", parents=[common])
    s.add_argument("--listen", default=DEFAULT_CONTROLLER, help="address to listen on (default %(default)s)")
    s.add_argument("--state", default="/var/lib/stasis/controller.db", help="SQLite state file")
    s.add_argument("--repo", default="file:///var/lib/stasis/repo",
                   help="checkpoint repository: file:///path or s3://bucket/prefix (AWS_* variables "
                        "give credentials and AWS_ENDPOINT_URL the server)")
    s.add_argument("--heartbeat", type=float, default=2.0, help="seconds between agent heartbeats")
    s.add_argument("--password-file", help="repository password (default: $STASIS_PASSWORD)")
    s.add_argument("--no-encryption", action="store_true",
                   help="when the repository does not exist yet, create it unencrypted")
    s.set_defaults(fn=cmd_controller_serve, daemon=True)

    p = add("agent", "run the agent daemon on this host", None)
    asub = p.add_subparsers(dest="sub", required=True, metavar="serve")
    s = asub.add_parser("serve", help="serve the agent API and register with the controller", parents=[common])
    s.add_argument("--listen", default="127.0.0.1:7071", help="address to listen on (default %(default)s)")
    s.add_argument("--host-name", required=True, help="this host's name in stasis (e.g. host-a)")
    s.add_argument("--advertise", help="address the controller should dial (default: --listen)")
    s.add_argument("--bulk-listen", metavar="HOST:PORT|off", default=os.environ.get("STASIS_BULK_LISTEN"),
                   help="where peer agents fetch a direct migration's bytes, over mutual TLS beside gRPC "
                        "(default: --listen's host and a free port, announced per transfer; or "
                        "$STASIS_BULK_LISTEN). Peers dial this port on the host of --advertise; if they "
                        "cannot, or with 'off', the bytes go over gRPC, which costs about twice the CPU")
    s.add_argument("--work-dir", help="where checkpoints are staged (default /var/lib/stasis/agent/HOST)")
    s.add_argument("--runtime", default="auto", choices=["auto", "podman", "docker"],
                   help="container engine (default: the one present)")
    s.add_argument("--docker-host", help="docker engine socket (default: $DOCKER_HOST or /var/run/docker.sock)")
    s.add_argument("--repo", help="the only repository this agent uses (default: the controller's, "
                                  "learnt at registration)")
    s.add_argument("--password-file", help="repository password (default: $STASIS_PASSWORD)")
    s.add_argument("--allow-unsigned", action="store_true",
                   help="also restore checkpoints no agent signed (written before TLS was set up); not advised")
    s.set_defaults(fn=cmd_agent_serve, daemon=True)

    add("hosts", "list hosts and their state, runtime and CRIU", cmd_hosts)
    p = add("ps", "list containers on every host (or one)", cmd_ps)
    p.add_argument("--host", help="only this host")
    p.add_argument("-a", "--all", action="store_true", help="include stopped containers")

    p = add("checkpoint", "checkpoint a container into the repository; prints the checkpoint id", cmd_checkpoint)
    p.add_argument("target", metavar="HOST/CONTAINER")
    p.add_argument("--leave-running", action="store_true",
                   help="keep the container running after the dump (default: it stops)")
    p.add_argument("--request-id", help="idempotency key: a retry with the same id attaches to the same job")

    p = add("checkpoints", "list checkpoints (or show one)", cmd_checkpoints)
    p.add_argument("id", nargs="?", help="show this checkpoint (a unique prefix is enough)")
    p.add_argument("--container", help="only checkpoints of this container name")
    p.add_argument("--host", help="only checkpoints taken on this host")

    p = add("restore", "restore a checkpoint on a host", cmd_restore)
    p.add_argument("checkpoint", metavar="CHECKPOINT_ID", help="checkpoint id or a unique prefix")
    p.add_argument("--to", required=True, metavar="HOST", help="host to restore on")
    p.add_argument("--name", help="name of the restored container (default: the checkpointed name)")
    p.add_argument("--request-id", help="idempotency key")

    p = add("migrate", "move a running container to another host, keeping its memory and files", cmd_migrate)
    p.add_argument("target", metavar="HOST/CONTAINER")
    p.add_argument("--to", required=True, metavar="HOST", help="destination host")
    p.add_argument("--via-repository", action="store_true",
                   help="move the checkpoint through the repository, which keeps it as a backup (slower); "
                        "default: straight from agent to agent over mutual TLS")
    p.add_argument("--ignore-volumes", action="store_true",
                   help="leave named volumes behind: both hosts mount the same shared storage under the same "
                        "volume names (default: their contents travel with the container)")
    p.add_argument("--post-copy", action="store_true",
                   help="restore on the destination first and let memory follow as it is touched: downtime "
                        "no longer grows with memory. The price: until every page has arrived the container "
                        "lives on both hosts, and losing the source (host, agent or network) then loses the "
                        "container. A failure of the destination resumes it on the source. Needs podman.")
    p.add_argument("--request-id", help="idempotency key")

    p = add("job", "show a job (checkpoint, restore, migrate) with its phases and timings", cmd_job)
    p.add_argument("id")
    p.add_argument("--watch", action="store_true", help="follow the job until it ends")

    def retention_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest")
        for unit in ("hourly", "daily", "weekly", "monthly"):
            p.add_argument(f"--keep-{unit}", type=int, metavar="N",
                           help=f"keep the newest of each of the last N {unit} periods")
        p.add_argument("--keep-within", metavar="DURATION", help="keep everything newer than this (e.g. 2d)")

    p = add("schedule", "scheduled backups: create, list, show, pause, resume, delete, run now", None)
    ssub = p.add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")
    s = ssub.add_parser("create", help="create a schedule", parents=[common],
                        description="Back up containers on a schedule without stopping them; retention runs "
                                    "after every backup and never removes a container's newest backup.")
    s.add_argument("name")
    s.add_argument("--selector", metavar="[HOST/]CONTAINER", help="one container (on any host if no HOST)")
    s.add_argument("--label", action="append", metavar="KEY=VALUE", help="every container with these labels")
    s.add_argument("--every", metavar="DURATION", help="e.g. 15m, 1h")
    s.add_argument("--cron", metavar="EXPR", help="five-field cron expression in UTC, e.g. '0 3 * * *'")
    retention_args(s)
    s.add_argument("--pre-hook", metavar="CMD", help="shell command run inside the container before the dump")
    s.add_argument("--post-hook", metavar="CMD", help="shell command run inside the container after the dump")
    s.add_argument("--hook-timeout", default="60s", metavar="DURATION")
    s.add_argument("--hook-on-error", choices=["fail", "continue"], default="fail",
                   help="fail: a failing pre-hook skips the backup (default); continue: back up anyway")
    s.add_argument("--paused", action="store_true")
    s.set_defaults(fn=cmd_schedule)
    s = ssub.add_parser("list", help="list schedules", parents=[common])
    s.set_defaults(fn=cmd_schedule)
    for action, text in (("show", "show one schedule"), ("pause", "stop running it"), ("resume", "run it again"),
                         ("delete", "delete it (its backups stay)"), ("run", "run it now")):
        s = ssub.add_parser(action, help=text, parents=[common])
        s.add_argument("name")
        s.set_defaults(fn=cmd_schedule)

    p = add("backups", "the backup timeline: time, host, size, new bytes, frozen time", cmd_backups)
    p.add_argument("--container")
    p.add_argument("--schedule")

    p = add("forget", "apply a retention policy to backups, like restic forget", cmd_forget)
    p.add_argument("--schedule", help="backups of this schedule (its policy applies unless --keep-* given)")
    p.add_argument("--container", help="only this container's backups")
    retention_args(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be forgotten, change nothing")
    p.add_argument("--prune", action="store_true", help="free the space right away")

    p = add("jobs", "list recent jobs, newest first", cmd_jobs)
    p.add_argument("--limit", type=int, default=50, help="how many (default %(default)s)")

    security_cli.add_commands(sub, common, add)
    forensics_cli.add_commands(sub, common, add)

    p = add("repo", "work on a repository directly (no controller needed)", None)
    rsub = p.add_subparsers(dest="repo_command", required=True, metavar="COMMAND")

    def repo_cmd(name: str, help: str, fn, before_url: tuple = ()) -> argparse.ArgumentParser:
        r = rsub.add_parser(name, help=help, description=help, parents=[common])
        for arg, kw in before_url:
            r.add_argument(arg, **kw)
        r.add_argument("url", metavar="REPO_URL", nargs="?", default=os.environ.get("STASIS_REPOSITORY"),
                       help="file:///path or s3://bucket/prefix (default: $STASIS_REPOSITORY)")
        r.add_argument("--password-file", help="file holding the password (default: $STASIS_PASSWORD)")
        r.set_defaults(fn=fn, daemon=True)
        return r

    r = repo_cmd("init", "create a repository (S3: the bucket too); encrypted unless --no-encryption", cmd_repo_init)
    r.add_argument("--no-encryption", action="store_true", help="store checkpoints in plaintext (not advised)")
    repo_cmd("info", "format, encryption, chunker, sizes and dedup ratio", cmd_repo_info)
    repo_cmd("checkpoints", "list the checkpoints a repository holds", cmd_repo_checkpoints)
    r = repo_cmd("stats", "stored and new bytes of one checkpoint", cmd_repo_stats)
    r.add_argument("checkpoint", metavar="CHECKPOINT_ID")
    r = repo_cmd("check", "verify structure; with --read-data every byte too", cmd_repo_check)
    r.add_argument("--read-data", action="store_true", help="download and verify every pack")
    r.add_argument("--subset", metavar="N%", help="read only this share of the packs, chosen at random")
    r = repo_cmd("prune", "delete data no checkpoint references (safe with concurrent writers)", cmd_repo_prune)
    r.add_argument("--dry-run", action="store_true", help="say what would be freed, change nothing")
    r.add_argument("--wait", type=float, default=0.0, help="seconds to wait for writers to finish")
    r = repo_cmd("forget", "remove checkpoints from the repository (prune frees their space)", cmd_repo_forget)
    r.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_ID")
    r = repo_cmd("key", "list, add or remove passwords (key files): key list|add|remove REPO_URL [ID]",
                 cmd_repo_key, (("key_command", {"choices": ["list", "add", "remove"]}),))
    r.add_argument("id", nargs="?", help="key id (remove)")
    r.add_argument("--new-password-file", help="the password to add (default: $STASIS_NEW_PASSWORD)")
    return parser


def _default_bundle(args) -> str:
    if getattr(args, "fn", None) is cmd_controller_serve:
        return "/etc/stasis/tls/controller"
    if getattr(args, "fn", None) is cmd_agent_serve:
        return "/etc/stasis/tls/agent"
    return os.path.join(os.path.expanduser("~"), ".config", "stasis", "tls")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "repo_command", None) and args.url and "://" not in args.url and hasattr(args, "checkpoints"):
            # `stasis repo forget ID...` with STASIS_REPOSITORY set: the first word was an id.
            args.checkpoints.insert(0, args.url)
            args.url = os.environ.get("STASIS_REPOSITORY")
        if getattr(args, "repo_command", None) and not args.url:
            raise InvalidArgument("name the repository: stasis repo COMMAND REPO_URL, or set STASIS_REPOSITORY")
        if not args.tls and not args.insecure:
            args.tls = _default_bundle(args)
        if getattr(args, "daemon", False):
            return args.fn(args)
        client = Client(args.controller,
                        lambda: transport_from_args(args.tls, args.insecure, "talking to the controller"))
        return args.fn(args, client)
    except StasisError as exc:
        print(f"stasis: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidArgument) else EXIT_FAILED
    except KeyboardInterrupt:
        print("stasis: interrupted; a job already started goes on: see 'stasis job ID --watch'", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
