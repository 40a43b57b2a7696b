"""The podman runtime driver: podman's CLI with JSON output, as asyncio subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from datetime import datetime, timezone
from typing import Awaitable, Callable

import structlog

from stasis.agent import freeze, podman_archive, volume_hold
from stasis.agent.process import run, tail
from stasis.agent.runtime import ContainerInfo, DumpStats, RestoreStats, Runtime
from stasis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, RuntimeFailure

log = structlog.get_logger("stasis.agent")
# Post-copy requests for the runc wrapper (scripts/runc-postcopy.sh reads the same folder).
LAZY_REQUESTS = "/run/stasis/lazy"
WRAPPER = "/usr/local/lib/stasis/runc"     # scripts/runc-postcopy.sh, installed by provisioning
WRAPPER_VERSION = "stasis-runc-wrapper: 4"   # the wrapper's line: pages aside, ID.started, ID.mark
PAGES_ASIDE = "stasis-pages"   # where it moves them, beside CRIU's image folder
STREAMED = "streamed"          # in it: the agent's links to the page files it sends during the dump

# What a migration must carry besides memory and files, as podman's own export can: established TCP
# connections (the container's own network namespace moves with it) and file locks. Harmless when
# the container has neither. Named volumes are in the export by default.
CARRY = ("--tcp-established", "--file-locks")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Dumping and writing many GiB takes a while; a hung CRIU must still not hold the agent forever.
DUMP_TIMEOUT = 1800.0


class PodmanRuntime(Runtime):
    name = "podman"

    def __init__(self, podman: str = "podman"):
        self.podman = podman
        # The last inspection of each container: a post-copy dump reuses the agent's own, taken a
        # moment before, instead of paying for another podman call while the clock runs.
        self._inspected: dict[str, tuple[float, dict]] = {}
        self._wrapper: bool | None = None
        self._landing: str | None = None
        self._sweep_landing = False

    async def _podman(self, *args: str, timeout: float = 120.0, check: bool = True, die_with_agent: bool = False):
        return await run([self.podman, *args], timeout=timeout, check=check, die_with_agent=die_with_agent)

    async def version(self) -> str:
        out = await self._podman("version", "--format", "json")
        return json.loads(out.stdout).get("Client", {}).get("Version", "")

    async def list(self, all: bool = False) -> list[ContainerInfo]:
        out = await self._podman("ps", "--format", "json", *(["--all"] if all else []))
        items = json.loads(out.stdout or "[]") or []
        return [ContainerInfo(
            id=c["Id"], name=(c.get("Names") or [""])[0], image=c.get("Image", ""),
            image_id=c.get("ImageID", ""), state=c.get("State", ""),
            created=_unix_to_rfc3339(c.get("Created")), labels=c.get("Labels") or {})
            for c in items if not c.get("IsInfra")]

    async def inspect(self, name: str) -> ContainerInfo:
        check_name(name)
        out = await self._podman("container", "inspect", "--format", "json", name, check=False)
        if out.returncode != 0:
            if "no such container" in out.stderr.lower():
                raise NotFound(f"no container {name!r} on this host; list them with 'stasis ps'")
            raise RuntimeFailure(f"podman inspect {name} failed: {tail(out.stderr)}")
        c = json.loads(out.stdout)[0]
        self._inspected[name] = (time.monotonic(), c)
        return ContainerInfo(
            id=c["Id"], name=c.get("Name", name), image=c.get("ImageName", ""),
            image_id=c.get("Image", ""), state=(c.get("State") or {}).get("Status", ""),
            created=c.get("Created", ""), labels=(c.get("Config") or {}).get("Labels") or {})

    async def checkpoint(self, name: str, archive: str, leave_running: bool,
                         ignore_volumes: bool = False) -> DumpStats:
        check_name(name)
        args = ["container", "checkpoint", name, "--export", archive, "--compress", "none",
                "--print-stats", *CARRY]
        if ignore_volumes:
            args.append("--ignore-volumes")
        if leave_running:
            args.append("--leave-running")
        started = time.monotonic()
        out = await self._podman(*args, timeout=DUMP_TIMEOUT, check=False)
        seconds = time.monotonic() - started
        if out.returncode != 0:
            raise RuntimeFailure(f"CRIU could not checkpoint {name}: {_criu_tail(out.stderr)}")
        stats = _first_container_stats(out.stdout)
        return DumpStats(seconds, {k: int(v) for k, v in (stats.get("criu_statistics") or {}).items()})

    async def restore(self, archive: str, name: str, renamed: bool = True,
                      ignore_volumes: bool = False, pages_port: int = 0, container_id: str = "",
                      pages_dir: str = "", restored: Callable[[], None] = lambda: None,
                      made: Callable[[str], None] = lambda _id: None) -> RestoreStats:
        check_name(name)
        same_id = not renamed and re.match(r"^[0-9a-f]{64}$", container_id) is not None
        if (pages_port or pages_dir) and not same_id:
            raise InvalidArgument("a restore with pages from elsewhere keeps the container's name and id")
        if pages_port:
            self._clear_requests(container_id, "lazy.log", "daemon")
            self._ask(container_id, "restore", pages_port)
        if pages_dir:
            self._ask(container_id, "pages", os.path.abspath(pages_dir))
        marked = same_id and await self._wrapped()
        if marked:   # CRIU's action script says when the processes resume, the wrapper how runc ended
            self._clear_requests(container_id, "resumed", "restored")
            self._ask(container_id, "mark", 0)
        if same_id:
            made(container_id)   # podman's import keeps the id
        restore = asyncio.ensure_future(self._restore(archive, name, renamed, ignore_volumes))
        try:
            ran = await self._until_resumed(container_id, restore, restored) if marked else None
            stats = await restore
            if ran is not None:   # podman's own work after runc's: not downtime
                stats.phases["bookkeeping"] = time.monotonic() - ran
            return stats
        finally:
            if not restore.done():   # cancelled: so is podman's restore, as before
                restore.cancel()
                await asyncio.gather(restore, return_exceptions=True)
            if same_id:
                self._clear_requests(container_id, "restore", "pages", "mark", "resumed", "restored")

    async def _until_resumed(self, cid: str, restore: asyncio.Future, restored: Callable[[], None]) -> float | None:
        """Call restored() as soon as CRIU has resumed the processes (its action script's marker) or
        runc's restore has succeeded (the wrapper's), whichever shows first; when it did."""
        resumed, runc = self._request(cid, "resumed"), self._request(cid, "restored")
        while not restore.done():
            if os.path.exists(resumed) or os.path.exists(runc):
                if not os.path.exists(resumed) and _read(runc) != "0":
                    return None
                restored()
                return time.monotonic()
            await asyncio.sleep(0.002)
        return None

    def sweep(self, older_than: float = 600.0) -> None:
        """Requests older than the wrapper would honour, and the pages of restores that never ended
        (a landing folder is only ever used by the agent that made it, in one restore)."""
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(LAZY_REQUESTS):
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > older_than:
                        os.unlink(entry.path)
        self._sweep_landing = True

    async def warm_up(self) -> None:
        # `podman info` costs ~0.3 CPU-seconds here (it asks the package manager about conmon and runc).
        await self.pages_landing()

    async def pages_landing(self) -> str:
        if not await self._wrapped():
            return ""
        if self._landing is None:
            # Beside podman's storage: a hard link needs the same mount, and a symbolic link does not
            # do (CRIU opens images after it has entered the container's root).
            out = await self._podman("info", "--format", "{{.Store.GraphRoot}}", check=False)
            root = out.stdout.strip() if out.returncode == 0 else ""
            self._landing = os.path.join(os.path.dirname(root.rstrip("/")), "stasis-pages") if root else ""
            if self._landing:
                os.makedirs(self._landing, mode=0o700, exist_ok=True)
                if self._sweep_landing:   # this agent has not landed anything yet: all of it is stale
                    self._sweep_landing = False
                    for entry in os.scandir(self._landing):
                        shutil.rmtree(entry.path, ignore_errors=True)
        return self._landing

    async def _restore(self, archive: str, name: str, renamed: bool, ignore_volumes: bool) -> RestoreStats:
        started = time.monotonic()
        # podman restores established TCP connections only into a container of the same name (a
        # renamed copy runs beside the original, whose connections those are).
        args = ["--name", name, "--file-locks"] if renamed else list(CARRY)
        if ignore_volumes:
            args.append("--ignore-volumes")
        # An agent that dies mid-restore takes podman with it: finishing unseen, it could leave a
        # running copy after the controller has resumed the source (restoring.py undoes what remains).
        out = await self._podman("container", "restore", "--import", archive, "--print-stats", *args,
                                 timeout=DUMP_TIMEOUT, check=False, die_with_agent=True)
        seconds = time.monotonic() - started
        if out.returncode != 0:
            if "already in use" in out.stderr:
                raise AlreadyExists(f"a container named {name!r} already exists on this host; "
                                    f"restore under another name with --name")
            raise RuntimeFailure(f"CRIU could not restore {name}: {_criu_tail(out.stderr)}")
        stats = _first_container_stats(out.stdout)
        return RestoreStats(seconds, stats.get("Id", ""),
                            {k: int(v) for k, v in (stats.get("criu_statistics") or {}).items()})

    # ---------------------------------------------------------------- post-copy
    # podman 4.3 cannot ask runc for lazy pages; its runc is our wrapper (scripts/runc-postcopy.sh),
    # which adds them for the containers named by a request file here.
    supports_post_copy = True

    @staticmethod
    def _request(container_id: str, kind: str) -> str:
        return os.path.join(LAZY_REQUESTS, f"{container_id}.{kind}")

    def _clear_requests(self, container_id: str, *kinds: str) -> None:
        for kind in kinds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._request(container_id, kind))

    def _ask(self, container_id: str, kind: str, value: int | str) -> None:
        os.makedirs(LAZY_REQUESTS, mode=0o700, exist_ok=True)
        with open(self._request(container_id, kind), "w") as f:
            f.write(f"{value}\n")

    async def checkpoint_for_transfer(self, name: str, archive: str, scratch: str, ignore_volumes: bool = False,
                                      freezing: Callable[[], None] = lambda: None,
                                      archived: Callable[[], Awaitable[None]] | None = None) -> DumpStats:
        if not await self._wrapped():   # provisioning not rerun since the wrapper learnt to set pages aside
            freezing()
            return await self.checkpoint(name, archive, False, ignore_volumes)
        c = await self._container_state(name)
        cid, static, upper, volumes = self._layout(c, ignore_volumes)
        # Bound to what podman may unmount in its clean-up, which the archive no longer waits for.
        with volume_hold.held(volumes, os.path.join(scratch, "volumes")) as volumes:
            aside = os.path.join(static, PAGES_ASIDE)
            # Pages a killed agent's migration left aside are stale: the container runs again since. So is
            # what an earlier dump (rolled back, or kept by --keep) left in the image folder; CRIU would
            # truncate those files in place, under a follower that had taken them for this dump's.
            await asyncio.to_thread(shutil.rmtree, aside, True)
            await asyncio.to_thread(_empty_folder, os.path.join(static, "checkpoint"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(static, podman_archive.DEVSHM))   # podman writes it anew if it has one
            # podman writes config.dump and spec.dump only when it exports, and its export is single-threaded
            # (~2 CPU-seconds a GiB, competing with the transfer for this host's cores). So the wrapper moves
            # CRIU's pages aside before podman exports: its export is small, and the archive is built here
            # with the pages. --keep leaves config.dump and spec.dump for that. The wrapper says when runc is
            # done (ID.dumped): the archive starts with CRIU's images while podman finishes its own work.
            status = os.path.join(static, "network.status")
            status_before = _mtime(status)
            self._clear_requests(cid, "dumped", "started")
            self._ask(cid, "aside", 0)
            args = ["container", "checkpoint", name, "--keep", "--export", os.path.join(scratch, "podman-export.tar"),
                    "--compress", "none", "--print-stats", *CARRY, *(["--ignore-volumes"] if ignore_volumes else [])]
            started = time.monotonic()
            dump = asyncio.ensure_future(self._podman(*args, timeout=DUMP_TIMEOUT, check=False))
            dumped = self._request(cid, "dumped")
            writer = podman_archive.ArchiveWriter(archive, references=True)   # the pages are read where they lie
            # Memory goes into the archive (and to the peer following it) while CRIU writes it.
            follower = podman_archive.PagesFollower(writer, os.path.join(static, "checkpoint"),
                                                    os.path.join(aside, STREAMED))
            stop = threading.Event()
            following = images = None
            prepare, sealed, dumps = 0.0, None, None

            async def complete() -> dict[str, bytes]:   # everything but CRIU's images, then the archive's end
                dumps = await asyncio.to_thread(podman_archive.read_dumps, static)
                shm = os.path.join(static, podman_archive.DEVSHM)   # podman's own, taken before it unmounted /dev/shm
                await asyncio.to_thread(writer.add_state, static, upper, volumes, dumps,
                                        shm if os.path.exists(shm) else None)
                writer.close()
                return dumps

            try:
                prepare = await self._until_frozen(cid, freeze.container_pid(c), dump, freezing)
                following = asyncio.ensure_future(asyncio.to_thread(follower.follow, stop))
                while not dump.done() and not os.path.exists(dumped):
                    await asyncio.sleep(0.005)
                stop.set()
                await following
                if _read(dumped) == "0":   # CRIU is done; its images are complete and the pages aside
                    images = asyncio.ensure_future(asyncio.to_thread(self._archive_images, writer, follower, static,
                                                                     aside))
                    # podman then tars /dev/shm and rewrites network.status, and that is all the archive
                    # needs from it. What follows (its own export, then a clean-up whose overlay unmount
                    # syncs the whole filesystem: 0.6 s of a 1 GiB migration's downtime, measured) is not
                    # waited for: the peer gets the end of the archive, and its seal, meanwhile.
                    if await _podman_state_written(dump, status, status_before):
                        await images
                        dumps = await complete()
                        sealed = time.monotonic() - started
                        if archived is not None:
                            await archived()
                out = await dump
                runtime = time.monotonic() - started
                if images is not None:
                    await images
                if out.returncode != 0 and sealed is None:
                    await asyncio.to_thread(self._pages_back, static)
                    raise RuntimeFailure(f"CRIU could not checkpoint {name}: {_criu_tail(out.stderr)}")
                if out.returncode != 0:
                    # CRIU succeeded (runc said so) and the archive is sealed from its complete images;
                    # podman's own export or clean-up failed. The peer may be restoring already: failing
                    # now would remove a working copy there for a resume here that podman's state may
                    # refuse. The migration goes on (a resume still puts the pages back first).
                    log.warning("podman failed after the archive was sealed; the migration goes on",
                                container=name, error=_criu_tail(out.stderr))
                if images is None:   # no notice came (an old wrapper); podman has finished anyway
                    await asyncio.to_thread(self._archive_images, writer, follower, static, aside)
                if dumps is None:
                    dumps = await complete()
            finally:
                stop.set()
                for task in (following, images):
                    if task is not None and not task.done():
                        await asyncio.gather(task, return_exceptions=True)
                writer.abandon()
                self._clear_requests(cid, "aside", "dumped", "started")
                freezing()   # once only: if runc never started, the dump failed
            criu = {k: int(v) for k, v in (_first_container_stats(out.stdout).get("criu_statistics") or {}).items()}
            phases = {"runtime": runtime, "archive": time.monotonic() - started - runtime, "prepare": prepare}
            if sealed is not None:   # the archive was complete before podman was: seconds from podman's start
                phases["sealed"] = sealed
            return DumpStats(time.monotonic() - started, criu or _stats(dumps.get("stats-dump")),
                             phases)

    async def _until_frozen(self, cid: str, pid: int, dump: asyncio.Future,
                            freezing: Callable[[], None]) -> float:
        """Call freezing() when CRIU freezes the container: after the wrapper has started runc (podman
        prepares ~50 ms before), once CRIU has seized the container's first process (runc and CRIU
        prepare ~45 ms more, while the container still runs). Polled finely, as a late look would
        shorten the downtime counted. Returns the seconds from runc's start to the freeze."""
        started = self._request(cid, "started")
        while not dump.done() and not os.path.exists(started):
            await asyncio.sleep(0.001)
        runc = time.monotonic()
        await freeze.until_seized(pid, dump.done)
        freezing()
        return time.monotonic() - runc

    @staticmethod
    def _archive_images(writer: podman_archive.ArchiveWriter, follower: podman_archive.PagesFollower,
                        static: str, aside: str) -> None:
        images = os.path.join(static, "checkpoint")
        writer.add_images(images, pages=False)
        follower.finish(aside, images)   # where the wrapper left them if it could not move them

    @staticmethod
    def _pages_back(static: str) -> None:
        """Return pages the wrapper set aside to CRIU's image folder, where a local restore reads them."""
        aside = os.path.join(static, PAGES_ASIDE)
        if not os.path.isdir(aside):
            return
        shutil.rmtree(os.path.join(aside, STREAMED), ignore_errors=True)   # links only: the files stay
        images = os.path.join(static, "checkpoint")
        for entry in os.listdir(aside):
            os.replace(os.path.join(aside, entry), os.path.join(images, entry))
        os.rmdir(aside)

    async def _wrapped(self) -> bool:
        """Whether podman's runc is our wrapper, and one that sets pages aside."""
        if self._wrapper is None:
            out = await self._podman("info", "--format", "{{.Host.OCIRuntime.Path}}", check=False)
            try:
                with open(WRAPPER) as f:
                    current = WRAPPER_VERSION in f.read()
            except OSError:
                current = False
            self._wrapper = out.returncode == 0 and out.stdout.strip() == WRAPPER and current
        return self._wrapper

    async def _container_state(self, name: str) -> dict:
        when, c = self._inspected.pop(check_name(name), (0.0, {}))
        if time.monotonic() - when > 5.0 or c.get("State", {}).get("Status") != "running":
            out = await self._podman("container", "inspect", "--format", "json", name)
            c = json.loads(out.stdout)[0]
        return c

    @staticmethod
    def _layout(c: dict, ignore_volumes: bool) -> tuple[str, str, str, dict[str, str]]:
        """(id, state folder, overlay upper folder, named volumes to carry) of an inspected container."""
        upper = ((c.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir", "")
        if not upper:
            raise FailedPrecondition(f"{c.get('Name', '?')} has no overlay upper folder; stasis needs podman's "
                                     f"overlay storage driver to build the migration archive")
        volumes = {} if ignore_volumes else {m["Name"]: m["Source"] for m in c.get("Mounts") or []
                                             if m.get("Type") == "volume"}
        return c["Id"], c["StaticDir"], upper, volumes

    async def checkpoint_post_copy(self, name: str, archive: str, scratch: str, ignore_volumes: bool, port: int,
                                   images_ready: Callable[[float], Awaitable[None]],
                                   freezing: Callable[[], None] = lambda: None) -> DumpStats:
        c = await self._container_state(name)
        cid, static, upper, volumes = self._layout(c, ignore_volumes)
        self._clear_requests(cid, "ready", "runc", "started")
        self._ask(cid, "dump", port)
        # podman writes config.dump and spec.dump only when it exports; its export itself comes
        # after the last page has left, holds no memory, and is thrown away.
        export = os.path.join(scratch, "podman-export.tar")
        args = ["container", "checkpoint", name, "--export", export, "--compress", "none", "--print-stats",
                *CARRY, *(["--ignore-volumes"] if ignore_volumes else [])]
        started = time.monotonic()
        dump = asyncio.ensure_future(self._podman(*args, timeout=DUMP_TIMEOUT, check=False))
        frozen = prepare = 0.0
        try:
            prepare = await self._until_frozen(cid, freeze.container_pid(c), dump, freezing)
            started = time.monotonic()   # what "frozen" counts from, as the downtime does
            ready = self._request(cid, "ready")
            while not dump.done() and not (os.path.exists(ready) and os.path.getsize(ready) > 0):
                await asyncio.sleep(0.005)
            if not dump.done():
                await asyncio.to_thread(podman_archive.write, archive, static, upper, volumes)
                frozen = time.monotonic() - started
                await images_ready(frozen)
            out = await dump
        except BaseException:
            await self.abort_post_copy(cid)
            await asyncio.gather(dump, return_exceptions=True)
            raise
        finally:
            self._clear_requests(cid, "dump", "ready", "runc", "started")
            freezing()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(export)
        if out.returncode != 0:
            raise RuntimeFailure(f"CRIU could not checkpoint {name} with post-copy: {_criu_tail(out.stderr)}")
        criu = {k: int(v) for k, v in (_first_container_stats(out.stdout).get("criu_statistics") or {}).items()}
        criu.pop("frozen_time", None)   # a lazy dump's figure counts the whole copy, not the downtime
        return DumpStats(frozen, criu, {"pages": time.monotonic() - started - frozen, "prepare": prepare})

    async def abort_post_copy(self, container_id: str) -> bool:
        # SIGTERM to the CRIU that runc started for this dump: it resumes the container (verified
        # here: memory intact). Closing its page server's connection instead would read as "done".
        try:
            with open(self._request(container_id, "runc")) as f:
                runc = int(f.read().strip())
        except (OSError, ValueError):
            return False
        for pid in _children(runc):
            if _comm(pid) == "criu":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                log.warning("post-copy dump aborted; the container resumes", container=container_id[:12])
                return True
        return False

    def post_copy_failure(self, container_id: str) -> str:
        log_path = os.path.join(LAZY_REQUESTS, f"{container_id}.lazy.log")
        try:
            with open(log_path, errors="replace") as f:
                errors = [line.strip() for line in f.read().splitlines()[-200:] if "Error" in line]
        except OSError:
            return ""
        return " | ".join(errors[-3:])

    def post_copy_ended(self, container_id: str) -> None:
        self._clear_requests(container_id, "daemon", "lazy.log")

    async def resume(self, name: str) -> None:
        c = await self._container_state(name)
        await asyncio.to_thread(self._pages_back, c["StaticDir"])
        out = await self._podman("container", "restore", name, *CARRY, timeout=DUMP_TIMEOUT, check=False)
        if out.returncode != 0:
            raise RuntimeFailure(f"could not resume {name} from its local checkpoint: {_criu_tail(out.stderr)}")

    async def remove(self, name: str, force: bool = False) -> None:
        check_name(name)
        out = await self._podman("rm", *(["--force", "--time", "0"] if force else []), name, check=False)
        if out.returncode != 0:
            if "no such container" in out.stderr.lower():
                raise NotFound(f"no container {name!r} on this host")
            if "running" in out.stderr.lower():
                raise FailedPrecondition(f"container {name!r} is running; stop it first or use --force")
            raise RuntimeFailure(f"podman rm {name} failed: {tail(out.stderr)}")

    async def memory_bytes(self, name: str) -> int:
        out = await self._podman("stats", "--no-stream", "--no-reset", "--format", "json", check_name(name),
                                 check=False)
        try:
            return parse_size(json.loads(out.stdout)[0]["mem_usage"].split("/")[0])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return 0

    async def exec(self, name: str, argv: list[str], timeout: float) -> tuple[int, str]:
        out = await self._podman("exec", check_name(name), *argv, timeout=timeout, check=False)
        return out.returncode, tail(out.stdout + "\n" + out.stderr, 10)

    async def image_exists(self, image_id: str) -> bool:
        out = await self._podman("image", "exists", image_id, check=False)
        return out.returncode == 0

    async def image_save(self, image: str, image_id: str, archive: str) -> None:
        # Saving by name keeps the tag, which podman's restore looks the image up by.
        ref = image if image and not image.startswith("<none>") else image_id
        await self._podman("save", "--quiet", "--format", "docker-archive", "-o", archive, ref,
                           timeout=DUMP_TIMEOUT)

    async def image_load(self, archive: str) -> None:
        await self._podman("load", "--quiet", "-i", archive, timeout=DUMP_TIMEOUT)


def _stats(raw: bytes | None) -> dict[str, int]:
    """CRIU's dump statistics from its stats-dump image (what podman's --print-stats reports)."""
    if not raw:
        return {}
    try:
        from stasis.forensics.images import ImageError, dump_stats

        return dump_stats(raw)
    except (ImportError, ImageError):
        return {}


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """podman's human sizes ('268.4MB', '596KiB') in bytes."""
    m = re.match(r"^\s*([0-9.]+)\s*([A-Za-z]*)\s*$", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def check_name(name: str) -> str:
    if not NAME.match(name or "") and not re.match(r"^[0-9a-f]{12,64}$", name or ""):
        raise InvalidArgument(f"container name {name!r} is invalid: use letters, digits, '_', '.', '-'")
    return name


def _first_container_stats(stdout: str) -> dict:
    try:
        data = json.loads(stdout)
        return (data.get("container_statistics") or [{}])[0]
    except (ValueError, AttributeError, IndexError):
        return {}


_LOGFILE = re.compile(r"(?:logfile|log file)[: ]+(/\S+?\.log)")


def _criu_tail(stderr: str) -> str:
    """podman's error plus the last error lines of CRIU's own log, which say what really failed."""
    message = tail(stderr, 3) or "no output"
    match = _LOGFILE.search(stderr or "")
    if match:
        try:
            with open(match.group(1), errors="replace") as f:
                lines = f.read().splitlines()[-200:]
        except OSError:
            return message
        errors = [line.strip() for line in lines if "Error" in line or "error" in line][-4:]
        if errors:
            message += " | CRIU log: " + " | ".join(errors)
    return message


def _empty_folder(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


async def _podman_state_written(dump: asyncio.Future, status: str, before: int, poll: float = 0.005) -> bool:
    """After runc's checkpoint returned, podman tars /dev/shm (if the container has its own) and then
    rewrites network.status: once that file has changed since `before` and holds whole JSON, what
    podman writes for a restore is there. False if podman exited first (or failed)."""
    while not dump.done():
        if _mtime(status) != before:
            with contextlib.suppress(OSError, ValueError):
                with open(status, "rb") as f:
                    json.loads(f.read(1 << 20))
                return True
        await asyncio.sleep(poll)
    return False


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _unix_to_rfc3339(value) -> str:
    try:
        return datetime.fromtimestamp(int(value), timezone.utc).isoformat().replace("+00:00", "Z")
    except (TypeError, ValueError, OverflowError):
        return ""
