"""The agent's work: checkpoint a container into the repository, restore one out of it.

Plain asyncio code over the Runtime and Repository seams; the gRPC servicer only translates.
Repeating an operation id attaches to the same work instead of doing it twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import structlog

from stasis.agent import bulk, failpoints, pages, pool, transfer, volume_hold
from stasis.agent.pages import free_loopback_port
from stasis.agent.memory_left import MemoryLeft
from stasis.agent.restoring import Restoring
from stasis.agent.podman import check_name
from stasis.agent.probe import CRIU_RUNDIR, cpuinfo_check, cpuinfo_dump, criu_cache, criu_version, probe
from stasis.agent.runtime import ContainerInfo, Runtime
from stasis.agent.transfer import Spool
from stasis.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                           PermissionDenied, RuntimeFailure, StasisError)
from stasis.security.authz import CALLER
from stasis.security.provenance import Signer, Verifier
from stasis.security.revocation import DenyList
from stasis.security.tickets import TicketChecker
from stasis.security.tls import Transport
from stasis.storage.manifest import Artifact, ContainerRef, Manifest
from stasis.storage.repository import Repository, new_checkpoint_id, now_rfc3339
from stasis.proto.v1 import stasis_pb2 as pb

log = structlog.get_logger("stasis.agent")

#: emit(phase, message, bytes_done, bytes_total)
Emit = Callable[[str, str, int, int], None]


# A direct checkpoint is not in the repository: its summary states the archive's size in this tag.
DIRECT_TAG = "direct_archive_bytes"
# Seconds a post-copy restore waits for its lazy-pages daemon to ask for memory before giving up
# (the source then resumes): a restored process touches memory at once.
DAEMON_WAIT = 60.0


@dataclass(frozen=True)
class Peer:
    """Where a direct migration's checkpoint is held: the source agent, and the controller's ticket."""
    host: str
    address: str
    ticket: bytes
    post_copy: bool = False
    page_ticket: bytes = b""


def _sealed_image(seal: dict, manifest: Manifest) -> Artifact:
    """The image a direct transfer's (verified) seal says to load from the repository."""
    if seal.get("image") is None:
        raise FailedPrecondition(f"image {manifest.container.image} is not on this host and the source "
                                 f"did not ship it")
    return Artifact.from_json(seal["image"], f"seal of checkpoint {manifest.id}.image")


@dataclass
class RestoreOutcome:
    container: ContainerInfo
    timings: dict[str, float] = field(default_factory=dict)


class AgentService:
    def __init__(self, host_name: str, runtime: Runtime, work_dir: str, repository: str = "",
                 password: str | None = None, signer: Signer | None = None, verifier: Verifier | None = None,
                 deny: DenyList | None = None, transport: Transport | None = None):
        self.host_name = host_name
        self.transport = transport or Transport.insecure()   # for fetching from peer agents
        # Provenance: checkpoints leave signed, and nothing unsigned or forged is restored. Without
        # TLS (--insecure) there is no CA to check against and both are None.
        self.signer = signer
        self.verifier = verifier
        self.deny = deny or DenyList()
        self.tickets = TicketChecker(self.transport.ca_certs, self.deny, host_name) if self.transport.secure else None
        self._password = password            # unlocks an encrypted repository; never logged
        self._repos: dict[str, Repository] = {}
        # The one repository this agent reads and writes: from --repo, else from the controller at
        # registration. A request naming another one is refused, so a caller cannot make this root
        # daemon restore from, or dump memory into, a repository of its choosing.
        self.repository = repository
        self.repository_pinned = bool(repository)
        self.runtime = runtime
        self.work_dir = work_dir
        os.makedirs(os.path.join(work_dir, "stage"), mode=0o700, exist_ok=True)
        self.spool = Spool(os.path.join(work_dir, "spool"))
        self.bulk: bulk.Listener | None = None   # direct transfers' bytes, beside gRPC (serve() opens it)
        self.pools = pool.Pools()   # memory made ready in preflight for a direct migration's pages
        self._ops: collections.OrderedDict[str, asyncio.Task] = collections.OrderedDict()
        self._criu_version = ""
        self._runtime_version = ""
        # Post-copy in flight. Source: checkpoint id -> (page server port, container id), and
        # container name -> the dump's end (rollback aborts it). Destination: name -> its relay.
        self._page_servers: dict[str, tuple[int, str]] = {}
        self._post_copy_dumps: dict[str, tuple[str, asyncio.Future]] = {}
        self._relays: dict[str, pages.DestinationRelay] = {}
        # Source: containers whose post-copy dump served every page. Their images here hold no
        # memory, so they can never be resumed from them.
        self._memory_left = MemoryLeft(os.path.join(work_dir, "memory-left"))
        # Destination: migrated containers whose restore began and was not yet reported.
        self._restoring = Restoring(os.path.join(work_dir, "restoring"))

    # ------------------------------------------------------------------ queries

    async def host_info(self) -> dict:
        info = await probe(self.host_name, self.runtime, self.work_dir)
        self._criu_version, self._runtime_version = info["criu_version"], info["runtime_version"]
        return info

    async def _versions(self) -> tuple[str, str]:
        # Each podman call costs tens of milliseconds; during a migration they count as downtime.
        if not self._criu_version:
            self._criu_version = await criu_version()
        if not self._runtime_version:
            self._runtime_version = await self.runtime.version()
        return self._criu_version, self._runtime_version

    async def list(self, all: bool) -> list[ContainerInfo]:
        return await self.runtime.list(all)

    async def inspect(self, name: str) -> ContainerInfo:
        try:
            return await self.runtime.inspect(name)
        except NotFound:
            raise NotFound(f"no container {name!r} on {self.host_name}; "
                           f"list them with 'stasis ps --host {self.host_name}'") from None

    async def remove(self, name: str, force: bool) -> None:
        relay = self._relays.pop(name, None)
        if relay is not None:   # the source must resume, not take the relay's EOF for "all sent"
            relay.abort(f"{name} was removed on {self.host_name}")
        with contextlib.suppress(StasisError):   # the mark is the container's, by id; the removal goes on
            self._memory_left.discard((await self.runtime.inspect(name)).id)
        await self.runtime.remove(name, force)
        self.spool.drop_container(name)

    async def exec(self, name: str, argv: list[str], timeout: float) -> tuple[int, str]:
        if not argv or len(argv) > 256:
            raise InvalidArgument("exec needs a command (at most 256 arguments)")
        await self.inspect(name)
        return await self.runtime.exec(name, argv, min(max(timeout, 1.0), 3600.0))

    async def describe_for_migration(self, name: str) -> tuple[bytes, int]:
        """What a destination must be able to take: this CPU (CRIU's view) and the memory to move."""
        await self.inspect(name)
        cpuinfo, memory = await asyncio.gather(cpuinfo_dump(self.work_dir), self.runtime.memory_bytes(name))
        return cpuinfo, memory

    async def check_migration(self, cpuinfo: bytes, memory_bytes: int, pool_pages: bool = False) -> None:
        """Refuse, before anything is frozen, a migration this host could not complete; with
        `pool_pages`, ready the memory its pages will be written into (agent/pool.py)."""
        problems = []
        if cpuinfo:
            why = await cpuinfo_check(cpuinfo, self.work_dir)
            if why:
                problems.append(f"its CPU lacks what the source's offers (criu cpuinfo check: {why})")
        # The archive lands in the stage folder, and podman copies it into its own storage.
        needed = int(memory_bytes * 1.5)
        free = shutil.disk_usage(self.work_dir).free
        if free < needed:
            problems.append(f"{free} bytes free in {self.work_dir}, about {needed} needed")
        if problems:
            raise FailedPrecondition(f"{self.host_name} cannot take this container: " + "; ".join(problems))
        if pool_pages:
            await self.pools.prepare(await self.runtime.pages_landing(), memory_bytes)

    async def resume(self, name: str) -> ContainerInfo:
        self.spool.drop_container(name)   # a rolled-back migration: nobody will fetch it now
        dumping = self._post_copy_dumps.get(name)
        if dumping is not None:   # CRIU still holds the container (and podman's lock): let it go
            await self.runtime.abort_post_copy(dumping[0])
            await asyncio.wait([dumping[1]], timeout=60)
        info = await self.runtime.inspect(name)
        if info.state != "running":
            if info.id in self._memory_left:
                raise FailedPrecondition(f"{name} cannot be resumed on {self.host_name}: its memory left with a "
                                         f"post-copy migration, and the images here hold none. The migrated "
                                         f"container is the only copy")
            await self.runtime.resume(name)
            info = await self.runtime.inspect(name)
        return info

    def learn_repository(self, url: str) -> None:
        if self.repository_pinned and url and url != self.repository:
            log.error("controller names another repository than --repo; keeping --repo",
                      configured=self.repository, controller=url)
            return
        self.repository = url or self.repository

    def _repository_url(self, requested: str) -> str:
        if not self.repository:
            raise FailedPrecondition(f"agent {self.host_name} has no repository yet: start it with --repo "
                                     f"or --controller")
        if requested and requested != self.repository:
            raise PermissionDenied(f"agent {self.host_name} serves repository {self.repository} only, "
                                   f"not {requested}")
        return self.repository

    async def warm_up(self) -> None:
        """Open the repository ahead of the first checkpoint or restore: unwrapping its key and
        loading its index would otherwise count as downtime in the first migration. The runtime's
        probes likewise, and CRIU's."""
        try:
            why = await asyncio.to_thread(criu_cache)
            if why:
                log.warning("CRIU cannot cache its kernel probes", reason=why)
        except OSError as exc:
            log.warning("CRIU cannot cache its kernel probes", folder=CRIU_RUNDIR, error=str(exc))
        try:
            await self.runtime.warm_up()
        except (StasisError, OSError) as exc:
            log.warning("cannot probe the container engine yet", runtime=self.runtime.name, error=str(exc))
        if self.repository and self.repository not in self._repos:
            try:
                repo = await self._open("")
                await asyncio.to_thread(repo.refresh_index)
            except StasisError as exc:
                log.warning("cannot open the repository yet", repository=self.repository, error=exc.message)

    async def _open(self, requested: str) -> Repository:
        """The agent's repository, opened once (unwrapping its key costs a deliberate scrypt)."""
        url = self._repository_url(requested)
        repo = self._repos.get(url)
        if repo is None:
            repo = self._repos[url] = await asyncio.to_thread(Repository.open, url, self._password)
        return repo

    # ------------------------------------------------------------------ idempotency

    async def _once(self, op_id: str, work: Callable[[], Awaitable]):
        """Run `work` once per operation id; a repeated id waits for (or replays) the first."""
        if not op_id:
            return await work()
        task = self._ops.get(op_id)
        if task is None:
            task = asyncio.ensure_future(work())
            self._ops[op_id] = task
            while len(self._ops) > 512:
                self._ops.popitem(last=False)
        return await asyncio.shield(task)

    # ------------------------------------------------------------------ checkpoint

    async def checkpoint(self, op_id: str, container: str, leave_running: bool, repo_url: str,
                         checkpoint_id: str, emit: Emit, tags: dict[str, str] | None = None,
                         direct: bool = False, ignore_volumes: bool = False, post_copy: bool = False) -> Manifest:
        return await self._once(op_id, lambda: self._checkpoint(
            op_id, container, leave_running, repo_url, checkpoint_id or new_checkpoint_id(), emit, tags or {},
            direct, ignore_volumes, post_copy))

    async def _checkpoint(self, op_id: str, container: str, leave_running: bool, repo_url: str,
                          ckpt_id: str, emit: Emit, tags: dict[str, str], direct: bool = False,
                          ignore_volumes: bool = False, post_copy: bool = False) -> Manifest:
        info = await self.inspect(container)
        if info.state != "running":
            raise FailedPrecondition(f"container {info.name!r} is {info.state}, not running; "
                                     f"only a running container can be checkpointed")
        self._memory_left.discard(info.id)   # it runs: the next dump's images are what count
        if direct and leave_running:
            raise InvalidArgument("a direct checkpoint is a migration's: it stops the container")
        if post_copy and not direct:
            raise InvalidArgument("post-copy serves memory to a peer agent: it needs a direct checkpoint")
        repo = await self._open(repo_url)
        criu, runtime_version = await self._versions()
        # Shared lock: a prune can neither run nor start until this checkpoint is committed.
        lock = await asyncio.to_thread(repo.lock, "shared")
        stage = ""
        timings: dict[str, float] = {}
        stored: dict[str, int] = {}
        dumped = False
        image_task = None
        try:
            stage = tempfile.mkdtemp(prefix=f"ckpt-{ckpt_id}-", dir=os.path.join(self.work_dir, "stage"))
            ship_image = not self.runtime.archive_includes_image
            if ship_image and not leave_running:
                # A stopping dump (migration): ship the immutable image meanwhile, off the downtime.
                image_task = asyncio.ensure_future(self._ship_image(repo, info, stage, timings, lock, stored))
            if leave_running:
                # A backup: the container is frozen while CRIU writes its pages. Flushing other dirty
                # data first, and saving the image only afterwards, keeps that freeze as short as
                # podman's own (nothing competes with CRIU for the disk).
                await asyncio.to_thread(os.sync)
            archive = os.path.join(stage, "checkpoint.tar")
            ref = ContainerRef(info.id, info.name, info.image, info.image_id, info.labels)
            if direct:
                # An image the repository holds already is named in the offer: a destination that
                # lacks it loads it while the source dumps, not after.
                known_image = (await asyncio.to_thread(repo.image_artifact, info.image_id)) if ship_image else None
                # The destination may fetch from now on: the offer describes the container, the
                # archive follows as podman writes it, the seal (size, hash, image) comes at the end.
                offer = Manifest(id=ckpt_id, created=now_rfc3339(), host=self.host_name, runtime=self.runtime.name,
                                 runtime_version=runtime_version, criu_version=criu, operation_id=op_id,
                                 container=ref, leave_running=False, checkpoint=Artifact.build([]), image=known_image,
                                 timings={}, criu_stats={}, tags=tags)
                if self.signer is not None:
                    offer = self.signer.sign(offer)
                archive = self.spool.begin(ckpt_id, offer.to_bytes(), info.name)
            announced = []

            def freezing() -> None:   # the freeze begins: a migration's downtime counts from here
                if not announced:
                    announced.append(True)
                    emit("dump", f"dumping {info.name} with CRIU", 0, 0)
            if post_copy:
                stats, size = await self._dump_post_copy(info, ckpt_id, archive, stage, ignore_volumes, image_task,
                                                         emit, freezing)
            elif direct:
                sealed_size: list[int] = []

                async def archived() -> None:   # the peer may have the seal before the engine is done
                    image = await image_task if image_task is not None else None
                    sealed_size.append(self.spool.size(ckpt_id))   # before the peer can take (and drop) it
                    self.spool.finish(ckpt_id, image.to_json() if image else None)

                stats = await self.runtime.checkpoint_for_transfer(info.name, archive, stage, ignore_volumes,
                                                                   freezing, archived)
                size = sealed_size[0] if sealed_size else self.spool.size(ckpt_id)
            else:
                freezing()
                stats = await self.runtime.checkpoint(info.name, archive, leave_running, ignore_volumes)
                size = os.path.getsize(archive)
            dumped = True
            if ship_image and image_task is None:
                image_task = asyncio.ensure_future(self._ship_image(repo, info, stage, timings, lock, stored))
            timings["dump"] = stats.seconds
            if stats.frozen_seconds is not None:   # CRIU's own figure (docker does not report it)
                timings["frozen"] = stats.frozen_seconds
            timings.update({f"dump.{k}": v for k, v in stats.phases.items()})
            failpoints.hit("checkpoint.after_dump")

            if direct:
                artifact = Artifact.build([])   # not in the repository: the summary states its size
                tags = {**tags, DIRECT_TAG: str(size)}
            else:
                emit("upload", f"uploading {size} bytes to {repo.url}", 0, size)
                started = time.monotonic()
                artifact = await asyncio.to_thread(
                    repo.store_file, archive, lambda d, t: emit("upload", "", d, t), "application/x-tar", lock,
                    stored)
                timings["upload"] = time.monotonic() - started
            image = await image_task if image_task is not None else None
            manifest = Manifest(
                id=ckpt_id, created=now_rfc3339(), host=self.host_name, runtime=self.runtime.name,
                runtime_version=runtime_version, criu_version=criu, operation_id=op_id, container=ref,
                leave_running=leave_running, checkpoint=artifact, image=image, timings=timings,
                criu_stats=stats.criu, tags=tags, new_bytes=stored.get("new_bytes", 0))
            if direct:
                self.spool.finish(ckpt_id, image.to_json() if image else None)
            else:
                if self.signer is not None:
                    manifest = self.signer.sign(manifest)
                await asyncio.to_thread(repo.write_manifest, manifest, lock)
            log.info("checkpoint stored", checkpoint=ckpt_id, container=info.name, bytes=size,
                     **{f"{k}_s": round(v, 3) for k, v in timings.items()})
            return manifest
        except BaseException as exc:
            if direct:   # a peer following the archive must learn that it is incomplete
                self.spool.fail(ckpt_id, exc if isinstance(exc, StasisError) else
                                RuntimeFailure(f"the checkpoint of {info.name} failed on {self.host_name}"))
            if dumped and not leave_running:
                # No checkpoint was committed: give the user their container back.
                await self._resume_after_failure(info.name, exc)
            raise
        finally:
            if image_task is not None:   # never delete the stage under a running `podman save`
                await asyncio.gather(image_task, return_exceptions=True)
            if stage:
                await asyncio.to_thread(shutil.rmtree, stage, True)
            await asyncio.to_thread(lock.release)

    async def _dump_post_copy(self, info: ContainerInfo, ckpt_id: str, archive: str, stage: str,
                              ignore_volumes: bool, image_task, emit: Emit, freezing: Callable[[], None]):
        """Everything but memory goes to the peer as a direct archive; memory stays in CRIU's page
        server, relayed to the peer (RelayPages) as it faults pages in. Returns when all have left."""
        sent = {}

        async def images_ready(frozen: float) -> None:
            sent["size"] = os.path.getsize(archive)
            image = await image_task if image_task is not None else None
            self.spool.finish(ckpt_id, image.to_json() if image else None)
            emit("pages", f"{info.name} is frozen ({frozen:.2f} s); memory is served to the destination", 0, 0)

        ended = asyncio.get_running_loop().create_future()
        self._page_servers[ckpt_id] = (free_loopback_port(), info.id)
        self._post_copy_dumps[info.name] = (info.id, ended)
        try:
            stats = await self.runtime.checkpoint_post_copy(info.name, archive, stage, ignore_volumes,
                                                            self._page_servers[ckpt_id][0], images_ready, freezing)
            self._memory_left.add(info.id)
        finally:
            self._page_servers.pop(ckpt_id, None)
            self._post_copy_dumps.pop(info.name, None)
            ended.set_result(None)
        return stats, sent.get("size", 0)

    async def relay_pages(self, requests) -> AsyncIterator[pb.PageBytes]:
        """Source side of RelayPages: the first message names the checkpoint and carries the ticket."""
        first = await anext(requests, None)
        if first is None or not first.checkpoint_id:
            raise InvalidArgument("RelayPages starts with a checkpoint id and a ticket")
        self._peer_with_ticket(first.ticket, first.checkpoint_id, "relay memory")
        served = self._page_servers.get(first.checkpoint_id)
        if served is None:
            raise NotFound(f"no post-copy dump of checkpoint {first.checkpoint_id} is serving memory on "
                           f"{self.host_name}")
        port, container_id = served
        async for msg in pages.serve_source(requests, port, lambda: self.runtime.abort_post_copy(container_id)):
            yield msg

    async def _resume_after_failure(self, name: str, exc: BaseException) -> None:
        try:
            await self.resume(name)
            log.warning("checkpoint failed after the dump; container resumed", container=name)
            if isinstance(exc, StasisError):
                exc.message += f" (container {name} was resumed on {self.host_name})"
        except Exception as err:  # noqa: BLE001 - report both failures, keep the first
            log.error("could not resume container after a failed checkpoint", container=name, error=str(err))

    async def _ship_image(self, repo: Repository, info: ContainerInfo, stage: str,
                          timings: dict[str, float], lock, stored: dict) -> Artifact:
        existing = await asyncio.to_thread(repo.image_artifact, info.image_id)
        if existing is not None:
            return existing
        started = time.monotonic()
        path = os.path.join(stage, "image.tar")
        await self.runtime.image_save(info.image, info.image_id, path)
        artifact = await asyncio.to_thread(repo.store_file, path, None, "application/x-tar", lock, stored)
        await asyncio.to_thread(repo.remember_image, info.image_id, artifact)
        timings["image_save"] = time.monotonic() - started
        return artifact

    # ------------------------------------------------------------------ restore

    async def restore(self, op_id: str, checkpoint_id: str, repo_url: str, name: str,
                      emit: Emit, peer: Peer | None = None, ignore_volumes: bool = False) -> RestoreOutcome:
        return await self._once(op_id, lambda: self._restore(checkpoint_id, repo_url, name, emit, peer,
                                                              ignore_volumes))

    async def fetch(self, checkpoint_id: str, ticket: bytes, compress: bool = False, want_bulk: bool = False):
        """Serve a held checkpoint to the peer agent the controller's ticket names; over the bulk
        channel when the peer can take it and this agent listens for it."""
        peer = self._peer_with_ticket(ticket, checkpoint_id, "fetch checkpoints")
        listener = self.bulk if want_bulk else None
        async for chunk in transfer.send(self.spool, self.signer, checkpoint_id, compress, listener, peer):
            yield chunk

    async def decline_bulk(self, checkpoint_id: str, ticket: bytes, token: bytes, reason: str) -> None:
        """The peer fetching `checkpoint_id` cannot reach the bulk channel: send on the stream now."""
        peer = self._peer_with_ticket(ticket, checkpoint_id, "decline a bulk channel", spend=False)  # fetch spent it
        if self.bulk is not None:
            self.bulk.decline(token, peer, reason)

    def _peer_with_ticket(self, ticket: bytes, checkpoint_id: str, what: str, spend: bool = True) -> str:
        """The calling peer agent's name, once its migration ticket for `checkpoint_id` is checked
        ("" without TLS, where no ticket is checked)."""
        caller = CALLER.get()
        if self.tickets is not None:
            if caller is None or caller.kind != "agent":
                raise PermissionDenied(f"only a peer agent with a migration ticket may {what}")
            self.tickets.check(ticket, checkpoint_id, caller.name, spend=spend)
        return caller.name if caller is not None else ""

    async def _restore(self, checkpoint_id: str, repo_url: str, name: str, emit: Emit,
                       peer: Peer | None = None, ignore_volumes: bool = False) -> RestoreOutcome:
        repo = await self._open(repo_url)
        receiver = None
        try:
            if peer is not None:
                if not peer.address or peer.host == self.host_name:
                    raise InvalidArgument("a direct restore needs the source agent's host name and address "
                                          "(another host than this one)")
                receiver = transfer.Receiver(self.transport, self.verifier, peer.host, peer.address, checkpoint_id,
                                             peer.ticket, peer.post_copy, peer.page_ticket)
                manifest = await receiver.offer()   # verified before anything acts on it
            else:
                manifest = await asyncio.to_thread(repo.read_manifest, checkpoint_id)
                if self.verifier is not None:   # before a single chunk is fetched
                    signer = self.verifier.verify(manifest)
                    log.info("checkpoint provenance verified", checkpoint=manifest.id,
                             signer=signer.principal if signer else "unsigned (allowed)")
            return await self._restore_manifest(repo, manifest, name, emit, receiver, ignore_volumes)
        finally:
            if receiver is not None:
                await receiver.channel.close()

    async def _restore_manifest(self, repo: Repository, manifest: Manifest, name: str, emit: Emit,
                                receiver: "transfer.Receiver | None", ignore_volumes: bool = False) -> RestoreOutcome:
        if manifest.runtime != self.runtime.name:
            raise FailedPrecondition(f"checkpoint {manifest.id} was taken with {manifest.runtime}; "
                                     f"this host runs {self.runtime.name}")
        name = check_name(name or manifest.container.name)
        taken, have_image = await asyncio.gather(self._exists(name), self._has_image(manifest))
        if taken:
            raise AlreadyExists(f"a container named {name!r} already exists on {self.host_name}; "
                                f"restore under another name with --name")
        need_image = not have_image
        if need_image and manifest.image is None and receiver is None:
            raise FailedPrecondition(f"image {manifest.container.image} is not on {self.host_name} "
                                     f"and checkpoint {manifest.id} does not ship it")
        # A direct transfer's size and image come with its seal; preflight checked the space.
        size = 0 if receiver is not None else manifest.checkpoint.size
        needed = size + (manifest.image.size if need_image and manifest.image else 0)
        free = shutil.disk_usage(self.work_dir).free
        if free < needed * 1.1:
            raise FailedPrecondition(f"not enough space in {self.work_dir} on {self.host_name}: "
                                     f"{needed} bytes needed, {free} free")

        # No prune while we read the repository. A direct restore of an image this host has reads
        # nothing from it, and skips the lock and the index refresh that comes with it: measured,
        # seconds once the repository holds a few GiB of checkpoints, while the source dumps.
        lock = await asyncio.to_thread(repo.lock, "shared") if receiver is None or need_image else None
        stage = ""
        timings: dict[str, float] = {}
        image_task = None
        relay = None
        pages_dir = taken = ""
        journaled = ""   # the id of a migration's copy the journal holds (restoring.py)
        try:
            stage = tempfile.mkdtemp(prefix=f"restore-{manifest.id}-", dir=os.path.join(self.work_dir, "stage"))
            if need_image and (receiver is None or manifest.image is not None):
                image_task = asyncio.ensure_future(self._load_image(repo, manifest, stage, timings))
            archive = os.path.join(stage, "checkpoint.tar")
            started = time.monotonic()
            landing = ""
            if receiver is not None and not receiver.post_copy and name == manifest.container.name:
                landing = await self.runtime.pages_landing()
            if landing:
                # The pages are written where CRIU will read them, not unpacked again by the runtime.
                pages_dir = tempfile.mkdtemp(prefix=f"{manifest.id}-", dir=landing)
                taken = self.pools.take()
            if receiver is not None:
                emit("transfer", f"receiving the archive from {receiver.peer} as it is written", 0, 0)
                # Hashed as it arrives; the source's signed seal is checked before the runtime runs.
                seal = await receiver.archive(archive, lambda d: emit("transfer", "", d, 0), pages_dir, taken)
                timings["transfer"] = time.monotonic() - started
                if pages_dir:
                    log.info("memory pages written beside the archive, for CRIU to read in place",
                             checkpoint=manifest.id, files=len(os.listdir(pages_dir)))
                if need_image and image_task is None:
                    image_task = asyncio.ensure_future(self._load_image(repo, dataclasses.replace(
                        manifest, image=_sealed_image(seal, manifest)), stage, timings))
            else:
                emit("download", f"downloading {size} bytes", 0, size)
                # Every chunk is hashed before it is written: nothing unverified reaches CRIU or tar.
                await asyncio.to_thread(repo.fetch_file, manifest.checkpoint, archive,
                                        lambda d, t: emit("download", "", d, t), f"checkpoint {manifest.id}")
                timings["download"] = time.monotonic() - started
            if image_task is not None:
                await image_task
            await failpoints.pause("restore.pause_before_runtime")
            failpoints.hit("restore.before_runtime")
            emit("restore", f"restoring {name} with CRIU", 0, 0)
            if receiver is not None and receiver.post_copy:
                relay = await self._relay_from(receiver, manifest, name)
            ran: list[bool] = []

            def restored() -> None:   # CRIU's restore is done and the process scheduled: downtime ends
                if not ran:
                    ran.append(True)
                    emit("running", f"{name} runs; its memory follows from {receiver.peer}" if relay is not None
                         else f"{name} runs", 0, 0)

            def made(container_id: str) -> None:   # a migration's copy: undone by id should this agent die unheard
                nonlocal journaled
                if receiver is not None:
                    journaled = container_id
                    self._restoring.begin(container_id, name)
            stats = await self.runtime.restore(archive, name, renamed=name != manifest.container.name,
                                               ignore_volumes=ignore_volumes,
                                               pages_port=await relay.start() if relay else 0,
                                               container_id=manifest.container.id, pages_dir=pages_dir,
                                               restored=restored, made=made)
            timings["restore"] = stats.seconds
            restored()   # the runtime may not tell sooner
            timings.update({f"restore.{k}": v for k, v in stats.phases.items()})
            if "restore_time" in stats.criu:
                timings["criu_restore"] = stats.criu["restore_time"] / 1e6
            info = await self.runtime.inspect(name)
            if info.state != "running":
                raise RuntimeFailure(f"restored container {name} is {info.state}, not running")
            if relay is not None:
                # The call ends once every page has arrived, so the controller commits only a
                # complete container.
                started = time.monotonic()
                try:
                    await asyncio.wait_for(relay.connected.wait(), DAEMON_WAIT)
                except asyncio.TimeoutError:
                    raise RuntimeFailure(f"CRIU's lazy-pages daemon on {self.host_name} never asked for "
                                         f"{name}'s memory within {DAEMON_WAIT:.0f} s") from None
                received = await relay.done
                # Every page has left the source: this copy is the only one, never to be undone.
                self._restoring.end(journaled)
                timings["pages"] = time.monotonic() - started
                log.info("post-copy complete", container=name, bytes=received, seconds=round(timings["pages"], 3))
            await failpoints.pause("restore.pause_after_runtime")
            if journaled:
                self._restoring.end(journaled)   # before anyone is told: see restoring.py
            log.info("checkpoint restored", checkpoint=manifest.id, container=name,
                     **{f"{k}_s": round(v, 3) for k, v in timings.items()})
            return RestoreOutcome(info, timings)
        except Exception:
            # Reported as it propagates: the controller's rollback removes what the runtime made. (Not
            # on cancellation: an agent shutting down reports nothing, and its next start undoes it.)
            if journaled:
                self._restoring.end(journaled)
            raise
        finally:
            if relay is not None and not relay.done.done():   # the restore failed: the source resumes
                relay.abort(f"the post-copy restore of {name} on {self.host_name} failed")
            if relay is not None:
                self._relays.pop(name, None)
            if image_task is not None:
                await asyncio.gather(image_task, return_exceptions=True)
            for folder in (stage, pages_dir):
                if folder:
                    await asyncio.to_thread(shutil.rmtree, folder, True)
            await asyncio.to_thread(pool.drop, taken)   # what is left of it: the pool's folder
            if lock is not None:
                await asyncio.to_thread(lock.release)

    async def _relay_from(self, receiver: "transfer.Receiver", manifest: Manifest, name: str):
        if not self.runtime.supports_post_copy:
            raise FailedPrecondition(f"{self.runtime.name} on {self.host_name} cannot restore with post-copy")
        relay = pages.DestinationRelay(self.transport, receiver.peer_host, receiver.peer_address, manifest.id,
                                       receiver.page_ticket,
                                       lambda: self.runtime.post_copy_failure(manifest.container.id))
        relay.done.add_done_callback(lambda _f: self.runtime.post_copy_ended(manifest.container.id))
        self._relays[name] = relay
        return relay

    async def _has_image(self, manifest: Manifest) -> bool:
        return self.runtime.archive_includes_image or await self.runtime.image_exists(manifest.container.image_id)

    async def clean_up_after_a_killed_agent(self) -> None:
        """Before serving any call: undo what an agent killed mid-work left. Volume holds of a dump
        (volume_hold.py), and the containers whose restore it began and never reported
        (restoring.py). A failure is logged, never fatal, and retried at the next start."""
        stage = os.path.join(self.work_dir, "stage")
        try:
            for target in await asyncio.to_thread(volume_hold.release_under, stage):
                log.warning("released a volume hold a killed agent left", path=target)
            unfinished = self._restoring.unfinished()
        except OSError as exc:
            log.error("could not look for what a killed agent left", error=str(exc))
            return
        for left in unfinished:
            try:
                try:
                    info = await self.runtime.inspect(left.name)
                except NotFound:
                    info = None
                if info is not None and info.id == left.container_id:
                    log.warning("removing a container whose restore a killed agent began and never reported; "
                                "its migration was rolled back", container=left.name, state=info.state)
                    await self.runtime.remove(left.name, force=True)
                self._restoring.end(left.container_id)
            except Exception as exc:  # noqa: BLE001 - the agent must start all the same
                log.error("could not undo a restore a killed agent left unfinished", container=left.name,
                          error=exc.message if isinstance(exc, StasisError) else repr(exc))

    async def _exists(self, name: str) -> bool:
        try:
            await self.runtime.inspect(name)
            return True
        except NotFound:
            return False

    async def _load_image(self, repo: Repository, manifest: Manifest, stage: str,
                          timings: dict[str, float]) -> None:
        assert manifest.image is not None
        started = time.monotonic()
        path = os.path.join(stage, "image.tar")
        await asyncio.to_thread(repo.fetch_file, manifest.image, path, None, f"image of checkpoint {manifest.id}")
        await self.runtime.image_load(path)
        if not await self.runtime.image_exists(manifest.container.image_id):
            raise RuntimeFailure(f"image {manifest.container.image} loaded but id "
                                 f"{manifest.container.image_id[:12]} is absent")
        timings["image_load"] = time.monotonic() - started
