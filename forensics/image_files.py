"""The files of a container image, from its docker-archive (what agents store with a checkpoint).

rootfs-diff.tar alone cannot tell a file the container added from one it modified: both are simply
in the overlay's upper layer. The image says which paths existed before the container ran. The
archive is read in place like a checkpoint's (storage.artifact_file.Window over a positional read):
manifest.json, then each layer's tar headers in order, whiteouts applied as overlayfs does.

The archive comes from the repository (authenticated), but its names are still only strings here:
nothing is extracted, and the counts are bounded.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib

from stasis.forensics.archive import ArchiveError, Pread, _first_line
from stasis.storage.artifact_file import Window

MAX_LAYERS = 512
MAX_ENTRIES = 2_000_000        # paths across every layer
MAX_MANIFEST = 1 << 20
WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"


def _members(pread: Pread, size: int, what: str) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of the regular files of a tar read in place."""
    out: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(fileobj=Window(pread, 0, size), mode="r:") as tar:
            for count, m in enumerate(tar):
                if count > MAX_LAYERS * 4:
                    raise ArchiveError(f"{what} has too many members for an image archive")
                if m.isfile():
                    out[m.name.removeprefix("./")] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{what} is not a readable tar file ({_first_line(e)})") from None
    return out


def image_paths(pread: Pread, size: int, what: str = "the image archive") -> set[str]:
    """Every path (absolute, normalised) of the image's root filesystem."""
    members = _members(pread, size, what)
    if "manifest.json" not in members or members["manifest.json"][1] > MAX_MANIFEST:
        raise ArchiveError(f"{what} is not a docker-archive: it has no (small) manifest.json")
    try:
        doc = json.loads(pread(*members["manifest.json"]))
        layers = doc[0]["Layers"]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise ArchiveError(f"{what}'s manifest.json does not list its layers") from None
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS or not all(isinstance(x, str) for x in layers):
        raise ArchiveError(f"{what}'s manifest.json lists its layers wrongly")
    paths: set[str] = set()
    for layer in layers:
        where = members.get(layer.removeprefix("./"))
        if where is None:
            raise ArchiveError(f"{what} lacks the layer {layer[:100]!r} its manifest.json names")
        _apply_layer(paths, Window(pread, where[0], where[1]), f"{what}, layer {layer[:24]}")
    return paths


def _apply_layer(paths: set[str], layer: Window, what: str) -> None:
    try:
        with tarfile.open(fileobj=layer, mode="r:*") as tar:
            for m in tar:
                path = "/" + posixpath.normpath("/" + m.name).lstrip("/")
                parent, base = posixpath.split(path)
                if base == OPAQUE:       # the folder's lower contents are hidden
                    prefix = parent.rstrip("/") + "/"
                    paths.difference_update([p for p in paths if p.startswith(prefix)])
                elif base.startswith(WHITEOUT):
                    gone = posixpath.join(parent, base[len(WHITEOUT):])
                    paths.difference_update([p for p in paths if p == gone or p.startswith(gone + "/")])
                elif path != "/":
                    paths.add(path)
                if len(paths) > MAX_ENTRIES:
                    raise ArchiveError(f"{what} lists more than {MAX_ENTRIES} paths")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{what} is not a readable tar file ({_first_line(e)})") from None
