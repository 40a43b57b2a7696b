"""The docker runtime driver: the Engine API through docker-py's low-level client.

docker-py has no checkpoint methods, so the checkpoint endpoints are called directly. Docker's
checkpoint holds no filesystem changes and restoring from a custom folder is refused, so:

  checkpoint = CRIU dump into the container's own checkpoints/ folder (where docker can restore
               it from, which is also how a failed migration resumes the source)
             + a commit of the container taken after the dump (its filesystem changes, including
               files CRIU saw open) saved as an image archive
             + the container's configuration (inspect), translated back on restore.

They travel as one tar (`checkpoint/…`, `image.tar`, `config.json`) in the repository, under the
same manifest format as podman's, with the runtime named in it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tarfile
import time
import uuid
from typing import Any, Awaitable, Callable

import docker
import docker.errors
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from stasis.agent import freeze
from stasis.agent.podman import check_name
from stasis.agent.runtime import ContainerInfo, DumpStats, RestoreStats, Runtime
from stasis.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, IntegrityError, NotFound,
                           RuntimeFailure, Unavailable)

log = structlog.get_logger("stasis.agent")
CHECKPOINT_PREFIX = "stasis-"
COMMIT_REPO = "localhost/stasis-checkpoint"
_ARCHIVE_MEMBERS = ("config.json", "image.tar")
_MAX_CONFIG = 4 << 20


def _content_exists(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeFailure) and "already exists" in exc.message


class DockerRuntime(Runtime):
    name = "docker"
    archive_includes_image = True

    def __init__(self, base_url: str = "unix:///var/run/docker.sock", timeout: float = 1800):
        self.base_url = base_url
        self.timeout = timeout
        self.client: docker.APIClient | None = None   # connected on first use

    # ------------------------------------------------------------------ helpers

    def _api(self) -> docker.APIClient:
        if self.client is None:
            self.client = docker.APIClient(base_url=self.base_url, timeout=self.timeout, version="auto")
        return self.client

    async def _call(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.NotFound as exc:
            raise NotFound(str(exc.explanation or exc)) from None
        except docker.errors.APIError as exc:
            raise RuntimeFailure(f"docker: {exc.explanation or exc}") from None
        except docker.errors.DockerException as exc:
            raise Unavailable(f"docker engine at {self.base_url} is unreachable ({exc}); is dockerd running?") from None

    def engine_info(self) -> dict[str, Any]:
        v = self._api().version()
        return {"engine_api_version": v.get("ApiVersion", ""), "engine_experimental": bool(v.get("Experimental")),
                "version": v.get("Version", "")}

    def require_experimental(self) -> None:
        info = self.engine_info()
        if not info["engine_experimental"]:
            raise FailedPrecondition(
                f"dockerd at {self.base_url} runs without experimental mode, which checkpoints need: add "
                f'{{"experimental": true}} to /etc/docker/daemon.json (or start dockerd with --experimental) '
                f"and restart it")

    def _root(self) -> str:
        return self._api().info()["DockerRootDir"]

    def _checkpoint_dir(self, container_id: str, name: str) -> str:
        return os.path.join(self._root(), "containers", container_id, "checkpoints", name)

    # ------------------------------------------------------------------ queries

    async def version(self) -> str:
        return (await self._call(self.engine_info))["version"]

    async def list(self, all: bool = False) -> list[ContainerInfo]:
        items = await self._call(self._api().containers, all=all)
        return [ContainerInfo(id=c["Id"], name=(c.get("Names") or ["/"])[0].lstrip("/"), image=c.get("Image", ""),
                              image_id=_strip(c.get("ImageID", "")), state=c.get("State", ""),
                              created=str(c.get("Created", "")), labels=c.get("Labels") or {}) for c in items]

    async def inspect(self, name: str) -> ContainerInfo:
        check_name(name)
        try:
            c = await self._call(self._api().inspect_container, name)
        except NotFound:
            raise NotFound(f"no container {name!r} on this host") from None
        return _info(c)

    # ------------------------------------------------------------------ checkpoint

    async def checkpoint(self, name: str, archive: str, leave_running: bool,
                         ignore_volumes: bool = False) -> DumpStats:
        # Volumes never travel in a docker checkpoint (the commit leaves them out): nothing to skip.
        api = self._api()
        c = await self._call(api.inspect_container, check_name(name))
        cid = c["Id"]
        ckpt = f"{CHECKPOINT_PREFIX}{uuid.uuid4().hex[:8]}"
        await self._drop_old_checkpoints(cid)
        started = time.monotonic()
        phases: dict[str, float] = {}
        await self._call(self._post, f"/containers/{cid}/checkpoints",
                         {"CheckpointID": ckpt, "Exit": not leave_running})
        phases["criu"] = time.monotonic() - started
        # The commit comes after the dump: files CRIU saw open exist, with the size it saw, in the
        # committed filesystem (a running container keeps writing; it is paused for the commit).
        tag = uuid.uuid4().hex[:12]
        mark = time.monotonic()
        image = await self._call(api.commit, cid, repository=COMMIT_REPO, tag=tag, pause=leave_running)
        ref = f"{COMMIT_REPO}:{tag}"
        stage = os.path.dirname(archive)
        image_tar = os.path.join(stage, "image.tar")
        try:
            await self._call(self._save_image, ref, image_tar)
        finally:
            await self._call(api.remove_image, image["Id"], force=True, noprune=False)
        phases["commit"] = time.monotonic() - mark
        mark = time.monotonic()
        config = {"inspect": c, "checkpoint": ckpt, "committed_image": ref}
        source = self._checkpoint_dir(cid, ckpt)
        await asyncio.to_thread(_write_archive, archive, source, image_tar, config)
        os.unlink(image_tar)
        phases["archive"] = time.monotonic() - mark
        return DumpStats(time.monotonic() - started, {}, phases)

    def _post(self, path: str, body: dict) -> None:
        api = self._api()
        res = api._post_json(api._url(path), data=body)
        api._raise_for_status(res)

    def _save_image(self, ref: str, path: str) -> None:
        with open(path, "wb") as f:
            for piece in self._api().get_image(ref):
                f.write(piece)

    async def checkpoint_for_transfer(self, name: str, archive: str, scratch: str, ignore_volumes: bool = False,
                                      freezing: Callable[[], None] = lambda: None,
                                      archived: Callable[[], Awaitable[None]] | None = None) -> DumpStats:
        # Downtime counts from CRIU's freeze, not from the API call: containerd and runc prepare first.
        c = await self._call(self._api().inspect_container, check_name(name))
        dump = asyncio.ensure_future(self.checkpoint(name, archive, False, ignore_volumes))
        try:
            await freeze.until_seized(freeze.container_pid(c), dump.done)
        finally:
            freezing()
        return await dump

    async def _drop_old_checkpoints(self, cid: str) -> None:
        api = self._api()
        try:
            res = await asyncio.to_thread(lambda: api._result(api._get(api._url(f"/containers/{cid}/checkpoints")),
                                                              json=True))
        except docker.errors.APIError:
            return
        for item in res or []:
            name = item.get("Name", "")
            if name.startswith(CHECKPOINT_PREFIX):
                await asyncio.to_thread(lambda n=name: api._delete(api._url(f"/containers/{cid}/checkpoints/{n}")))

    # ------------------------------------------------------------------ restore

    async def restore(self, archive: str, name: str, renamed: bool = True,
                      ignore_volumes: bool = False, pages_port: int = 0, container_id: str = "",
                      pages_dir: str = "", restored: Callable[[], None] = lambda: None,
                      made: Callable[[str], None] = lambda _id: None) -> RestoreStats:
        api = self._api()
        check_name(name)
        stage = archive + ".d"
        started = time.monotonic()
        phases: dict[str, float] = {}
        try:
            config = await asyncio.to_thread(_extract_archive, archive, stage)
            phases["extract"] = time.monotonic() - started
            mark = time.monotonic()
            with open(os.path.join(stage, "image.tar"), "rb") as f:
                await self._call(lambda: list(api.load_image(f)))
            phases["image_load"] = time.monotonic() - mark
            ref = config["committed_image"]
            create, host = translate(config["inspect"])
            try:
                created = await self._call(api.create_container, image=ref, name=name,
                                           host_config=api.create_host_config(**host), **create)
            except RuntimeFailure as exc:
                if "Conflict" in exc.message or "already in use" in exc.message:
                    raise AlreadyExists(f"a container named {name!r} already exists on this host") from None
                raise
            cid = created["Id"]
            made(cid)   # a new id, known once docker has created it (and before CRIU runs)
            ckpt = config["checkpoint"]
            target = self._checkpoint_dir(cid, ckpt)
            # A rename, not a copy, when the stage and docker's root share a file system.
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            await asyncio.to_thread(shutil.move, os.path.join(stage, "checkpoint"), target)
            mark = time.monotonic()
            try:
                await self._start_from_checkpoint(cid, ckpt, name)
            except RuntimeFailure as exc:
                await self._call(api.remove_container, cid, force=True)
                raise RuntimeFailure(f"CRIU could not restore {name}: {exc.message}") from None
            phases["criu"] = time.monotonic() - mark
            return RestoreStats(time.monotonic() - started, cid, {}, phases)
        finally:
            await asyncio.to_thread(shutil.rmtree, stage, True)

    async def _start_from_checkpoint(self, cid: str, ckpt: str, name: str) -> None:
        # containerd refuses the checkpoint's upload with "content ... already exists" while the blob
        # its own dump made (the same tar, byte for byte) waits for garbage collection: soon after the
        # dump, as in a quick rollback (moby issue 42900; twice in CI). It goes within seconds.
        async for attempt in AsyncRetrying(retry=retry_if_exception(_content_exists), reraise=True,
                                           stop=stop_after_attempt(6), wait=wait_exponential(0.25, max=4)):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    log.warning("docker refused the checkpoint's content as already present; starting again",
                                container=name, attempt=attempt.retry_state.attempt_number)
                await self._call(self._post_start, cid, ckpt)

    def _post_start(self, cid: str, ckpt: str) -> None:
        api = self._api()
        res = api._post(api._url(f"/containers/{cid}/start"), params={"checkpoint": ckpt})
        api._raise_for_status(res)

    async def resume(self, name: str) -> None:
        api = self._api()
        c = await self._call(api.inspect_container, check_name(name))
        res = await asyncio.to_thread(lambda: api._result(api._get(api._url(f"/containers/{c['Id']}/checkpoints")),
                                                          json=True))
        names = [i.get("Name", "") for i in res or [] if i.get("Name", "").startswith(CHECKPOINT_PREFIX)]
        if not names:
            raise RuntimeFailure(f"{name} has no stasis checkpoint to resume from")
        await self._start_from_checkpoint(c["Id"], names[-1], name)

    async def remove(self, name: str, force: bool = False) -> None:
        try:
            await self._call(self._api().remove_container, check_name(name), force=force)
        except NotFound:
            raise NotFound(f"no container {name!r} on this host") from None

    async def memory_bytes(self, name: str) -> int:
        stats = await self._call(self._api().stats, name, stream=False)
        try:
            return int(stats["memory_stats"]["usage"])
        except (KeyError, TypeError, ValueError):
            return 0

    async def exec(self, name: str, argv: list[str], timeout: float) -> tuple[int, str]:
        api = self._api()

        def run() -> tuple[int, str]:
            ex = api.exec_create(check_name(name), argv)
            out = api.exec_start(ex["Id"]).decode(errors="replace")
            return int(api.exec_inspect(ex["Id"]).get("ExitCode") or 0), out

        try:
            code, out = await asyncio.wait_for(self._call(run), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"command in {name} did not finish within {timeout:.0f} s") from None
        return code, "\n".join(out.strip().splitlines()[-10:])

    # ------------------------------------------------------------------ images (unused: archives carry them)

    async def image_exists(self, image_id: str) -> bool:
        try:
            await self._call(self._api().inspect_image, image_id)
            return True
        except NotFound:
            return False

    async def image_save(self, image: str, image_id: str, archive: str) -> None:
        await self._call(self._save_image, image or image_id, archive)

    async def image_load(self, archive: str) -> None:
        with open(archive, "rb") as f:
            await self._call(lambda: list(self._api().load_image(f)))


# ---------------------------------------------------------------------------- pure parts (unit-tested)

def translate(inspect: dict) -> tuple[dict, dict]:
    """Docker's inspect output -> (create_container kwargs, create_host_config kwargs)."""
    cfg, hc = inspect.get("Config") or {}, inspect.get("HostConfig") or {}
    create = {
        "command": cfg.get("Cmd"), "entrypoint": cfg.get("Entrypoint"), "environment": cfg.get("Env"),
        "working_dir": cfg.get("WorkingDir") or None, "user": cfg.get("User") or None,
        "labels": cfg.get("Labels") or {}, "hostname": cfg.get("Hostname") or None,
        "domainname": cfg.get("Domainname") or None, "tty": bool(cfg.get("Tty")),
        "stdin_open": bool(cfg.get("OpenStdin")), "stop_signal": cfg.get("StopSignal") or None,
        "volumes": list((cfg.get("Volumes") or {}).keys()) or None,
    }
    host = {
        "network_mode": hc.get("NetworkMode") or "none", "binds": hc.get("Binds") or None,
        "mem_limit": hc.get("Memory") or None, "memswap_limit": hc.get("MemorySwap") or None,
        "cpu_shares": hc.get("CpuShares") or None, "cpu_quota": hc.get("CpuQuota") or None,
        "cpu_period": hc.get("CpuPeriod") or None, "cpuset_cpus": hc.get("CpusetCpus") or None,
        "pids_limit": hc.get("PidsLimit") or None, "privileged": bool(hc.get("Privileged")),
        "cap_add": hc.get("CapAdd") or None, "cap_drop": hc.get("CapDrop") or None,
        "read_only": bool(hc.get("ReadonlyRootfs")), "tmpfs": hc.get("Tmpfs") or None,
        "shm_size": hc.get("ShmSize") or None, "security_opt": hc.get("SecurityOpt") or None,
        "ulimits": [docker.types.Ulimit(name=u["Name"], soft=u["Soft"], hard=u["Hard"])
                    for u in hc.get("Ulimits") or []] or None,
        "restart_policy": hc.get("RestartPolicy") if (hc.get("RestartPolicy") or {}).get("Name") else None,
    }
    return ({k: v for k, v in create.items() if v is not None},
            {k: v for k, v in host.items() if v is not None})


def _write_archive(path: str, checkpoint_dir: str, image_tar: str, config: dict) -> None:
    with tarfile.open(path, "w") as tar:
        data = json.dumps(config).encode()
        info = tarfile.TarInfo("config.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(image_tar, arcname="image.tar")
        tar.add(checkpoint_dir, arcname="checkpoint")


def _extract_archive(path: str, dest: str) -> dict:
    """Extract our own archive, refusing every member that is not a plain file or folder under
    checkpoint/, image.tar or config.json (the bytes were verified, the layout is checked too)."""
    os.makedirs(dest, mode=0o700)
    with tarfile.open(path, "r:") as tar:
        members = tar.getmembers()
        for m in members:
            name = m.name
            parts = name.split("/")
            ok = (name in _ARCHIVE_MEMBERS and m.isfile()) or (
                parts[0] == "checkpoint" and ".." not in parts and not name.startswith("/")
                and (m.isfile() or m.isdir()))
            if not ok:
                raise IntegrityError(f"checkpoint archive member {name!r} is not allowed: refusing to restore")
        tar.extractall(dest, members=members, filter="data")
    try:
        with open(os.path.join(dest, "config.json")) as f:
            raw = f.read(_MAX_CONFIG + 1)
        config = json.loads(raw)
        assert len(raw) <= _MAX_CONFIG and isinstance(config["inspect"], dict)
        assert str(config["checkpoint"]).startswith(CHECKPOINT_PREFIX) and "/" not in config["checkpoint"]
        assert str(config["committed_image"]).startswith(COMMIT_REPO + ":")
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise IntegrityError("checkpoint archive has no valid config.json") from None
    if not os.path.isfile(os.path.join(dest, "image.tar")) or not os.path.isdir(os.path.join(dest, "checkpoint")):
        raise IntegrityError("checkpoint archive lacks its image or CRIU images")
    return config


def _info(c: dict) -> ContainerInfo:
    return ContainerInfo(id=c["Id"], name=c.get("Name", "").lstrip("/"), image=(c.get("Config") or {}).get("Image", ""),
                         image_id=_strip(c.get("Image", "")), state=(c.get("State") or {}).get("Status", ""),
                         created=c.get("Created", ""), labels=(c.get("Config") or {}).get("Labels") or {})


def _strip(image_id: str) -> str:
    return image_id.split(":", 1)[1] if image_id.startswith("sha256:") else image_id


def engine_socket_exists(base_url: str) -> bool:
    return not base_url.startswith("unix://") or os.path.exists(base_url[len("unix://"):])
