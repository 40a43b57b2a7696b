"""Podman's checkpoint archive, written by us from the container's state.

A post-copy dump never returns to podman before the destination has taken every page, so podman's
own `--export` comes too late; and in a stop-and-copy migration podman's single-threaded export of
the pages would compete with the transfer for this host's cores. The layout that `podman container
restore --import` reads is rebuilt here from what podman and CRIU have already written: CRIU's
images, config.dump and spec.dump (in the container's state folder), the root filesystem's changes
(its overlay upper folder), /dev/shm and named volumes. The container is frozen (post-copy) or
stopped (stop-and-copy) meanwhile, so none of it changes under us.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import tempfile

# Files podman manages itself in every container (bind mounts, recreated at restore): its own
# export leaves them out of the root filesystem's changes as well.
MANAGED = {"etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab", "run/.containerenv"}
DEVSHM = "devshm-checkpoint.tar"   # /dev/shm's contents, in the archive and as podman leaves it


def rootfs_changes(upper: str) -> tuple[list[str], list[str]]:
    """(added or changed paths, deleted paths) of an overlay upper folder, relative to the root."""
    changed, deleted = [], []
    for folder, dirs, files in os.walk(upper):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, upper)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:   # an overlay whiteout: deleted below
                deleted.append("/" + rel)
            elif rel not in MANAGED:
                changed.append(rel)
    return changed, deleted


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    tar.addfile(info, io.BytesIO(data))


def _add_nested(tar: tarfile.TarFile, name: str, members: list[tuple[str, str, bool]]) -> None:
    """A tar inside the archive, of (path, name inside, recursive) members; staged in a temporary
    file beside the archive, since a volume may be large."""
    with tempfile.TemporaryFile(dir=os.path.dirname(tar.name or ".")) as staged:
        with tarfile.open(fileobj=staged, mode="w") as inner:
            for path, arcname, recursive in members:
                inner.add(path, arcname=arcname, recursive=recursive)
        info = tarfile.TarInfo(name)
        info.size, info.mode = staged.tell(), 0o600
        staged.seek(0)
        tar.addfile(info, staged)


def _tree(folder: str) -> list[tuple[str, str, bool]]:
    """A folder's contents (how podman ships /dev/shm and each volume)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [(os.path.join(folder, n), n, True) for n in names]


def read_dumps(static_dir: str) -> dict[str, bytes]:
    """config.dump, spec.dump (podman writes them before CRIU runs) and stats-dump (CRIU's, at its
    end): podman deletes all three once its own export is done, so they are taken early."""
    out = {}
    for name in ("config.dump", "spec.dump", "stats-dump"):
        try:
            with open(os.path.join(static_dir, name), "rb") as f:
                out[name] = f.read()
        except FileNotFoundError:
            if name != "stats-dump":
                raise
    return out


def write(archive: str, static_dir: str, upper: str, volumes: dict[str, str],
          dumps: dict[str, bytes] | None = None, pages: str | None = None, shm_tar: str | None = None) -> None:
    """Write the import archive; `volumes` maps a named volume to its folder ({} leaves them out);
    `dumps`: read_dumps() taken earlier (default: read now); `pages`: a folder holding CRIU's
    pages-*.img that are not in its image folder; `shm_tar`: /dev/shm as podman tarred it (default:
    tar the mounted folder, which a frozen container still has)."""
    dumps = dumps if dumps is not None else read_dumps(static_dir)
    with tarfile.open(archive, "w", copybufsize=1 << 20) as tar:
        tar.add(os.path.join(static_dir, "checkpoint"), arcname="checkpoint")
        for name in sorted(os.listdir(pages)) if pages and os.path.isdir(pages) else []:
            if name.startswith("pages-") and name.endswith(".img"):
                tar.add(os.path.join(pages, name), arcname=f"checkpoint/{name}", recursive=False)
        for name, data in dumps.items():
            _add_bytes(tar, name, data)
        # podman's record of the container's network (written when it started); "null" without one.
        try:
            with open(os.path.join(static_dir, "network.status"), "rb") as f:
                status = f.read(1 << 20)
        except FileNotFoundError:
            status = b"null"
        _add_bytes(tar, "network.status", status)
        if shm_tar:
            tar.add(shm_tar, arcname=DEVSHM, recursive=False)
        else:
            _add_nested(tar, DEVSHM, _tree(os.path.join(static_dir, "shm")))
        changed, deleted = rootfs_changes(upper)
        _add_nested(tar, "rootfs-diff.tar", [(os.path.join(upper, rel), rel, False) for rel in changed])
        if deleted:
            _add_bytes(tar, "deleted.files", json.dumps(deleted).encode())
        for name, folder in sorted(volumes.items()):
            _add_nested(tar, f"volumes/{name}.tar", _tree(folder))
