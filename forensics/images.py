"""Decoding CRIU image files, which are hostile input: every failure is one ImageError line.

An image file is, for most images, the 4-byte IMG_COMMON magic (IMG_SERVICE for statistics; nothing
for the inventory), then the image's own 4-byte magic, then entries: a little-endian u32 size and
that many bytes of protobuf. A few images carry raw bytes after some entries (pipe and socket
queues), and the pagemap starts with a head entry of another type. pages-*.img are raw pages with
no header at all: forensics/memory.py reads those.

The message classes come from CRIU's own images/*.proto, compiled by scripts/criu-images.sh.
"""

from __future__ import annotations

import importlib
import io
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from stasis.errors import IntegrityError

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940

# The format sets no limits, but a real entry is small: the largest are mm (one vma_entry per mapping, at
# most ~65k mappings) and core. Raw queues behind an entry are bounded by pipe and socket buffers.
MAX_ENTRY = 16 << 20
MAX_PAYLOAD = 64 << 20
MAX_ENTRIES = 1 << 20
MAX_IMAGE = 256 << 20     # decoded entries and payloads that read_image() holds in memory


class ImageError(IntegrityError):
    """A CRIU image is unreadable: unknown, truncated, oversized or not valid protobuf."""


@dataclass(frozen=True)
class Kind:
    name: str          # CRIU's name for the image type, as crit prints it (lower case)
    module: str        # stasis.forensics.criu_pb.<module>_pb2
    message: str       # the entries' message type
    head: str = ""     # a first entry of another type (pagemap)
    # Raw bytes that follow each entry: the names of the entry's fields that add up to their length.
    payload: tuple[str, ...] = ()


def _kinds(*rows: tuple) -> dict[int, Kind]:
    return {magic: Kind(*rest) for magic, *rest in rows}


# The image types forensics reads (magic numbers from CRIU's criu/include/magic.h).
KINDS = _kinds(
    (0x58313116, "inventory", "inventory", "inventory_entry"),
    (0x50273030, "pstree", "pstree", "pstree_entry"),
    (0x55053847, "core", "core", "core_entry"),
    (0x54432030, "ids", "core", "task_kobj_ids_entry"),
    (0x57492820, "mm", "mm", "mm_entry"),
    (0x54123737, "vmas", "vma", "vma_entry"),
    (0x56084025, "pagemap", "pagemap", "pagemap_entry", "pagemap_head"),
    (0x56303138, "files", "fdinfo", "file_entry"),
    (0x56213732, "fdinfo", "fdinfo", "fdinfo_entry"),
    (0x51403912, "fs", "fs", "fs_entry"),
    (0x50363636, "reg-files", "regfile", "reg_file_entry"),
    (0x59133954, "remap-fpath", "remap_file_path", "remap_file_path_entry"),
    (0x56443851, "inetsk", "sk_inet", "inet_sk_entry"),
    (0x54373943, "unixsk", "sk_unix", "unix_sk_entry"),
    (0x58005614, "netlinksk", "sk_netlink", "netlink_sk_entry"),
    (0x56264026, "sk-queues", "sk_packet", "sk_packet_entry", "", ("length",)),
    (0x51465506, "tcp-stream", "tcp_stream", "tcp_stream_entry", "", ("inq_len", "outq_len")),
    (0x56513555, "pipes", "pipe", "pipe_entry"),
    (0x56453709, "pipes-data", "pipe_data", "pipe_data_entry", "", ("bytes",)),
    (0x59333054, "fifo-data", "pipe_data", "pipe_data_entry", "", ("bytes",)),
    (0x55563928, "mountpoints", "mnt", "mnt_entry"),
    (0x55933752, "netns", "netdev", "netns_entry"),
    (0x57373951, "netdev", "netdev", "net_device_entry"),
    (0x54473203, "utsns", "utsns", "utsns_entry"),
    (0x55474906, "userns", "userns", "userns_entry"),
    (0x61157326, "pidns", "pidns", "pidns_entry"),
    (0x43114433, "timens", "timens", "timens_entry"),
    (0x53115007, "ipcns-var", "ipc_var", "ipc_var_entry"),
    (0x59453036, "tty-info", "tty", "tty_info_entry"),
    (0x59433025, "tty-files", "tty", "tty_file_entry"),
    (0x59413026, "tty-data", "tty", "tty_data_entry"),
    (0x54023547, "creds", "creds", "creds_entry"),
    (0x64413049, "seccomp", "seccomp", "seccomp_entry"),
    (0x59383330, "cgroup", "cgroup", "cgroup_entry"),
    (0x54323616, "file-locks", "file_lock", "file_lock_entry"),
    (0x59255647, "signal", "siginfo", "signal_queue_entry"),
    (0x48453499, "memfd-inode", "memfd", "memfd_inode_entry"),
    (0x61404013, "cpuinfo", "cpuinfo", "cpuinfo_entry"),
    (0x59423047, "apparmor", "apparmor", "apparmor_entry"),
    (0x57093306, "stats", "stats", "stats_entry"),
)
INVENTORY_MAGIC = 0x58313116


@dataclass
class Image:
    name: str                     # the file's name, for messages
    kind: Kind
    head: object | None = None    # pagemap_head for a pagemap, else None
    entries: list = field(default_factory=list)
    # Raw bytes behind entry i (pipe contents, socket queues), for kinds that have them.
    payloads: dict[int, bytes] = field(default_factory=dict)


def message_class(module: str, message: str) -> type:
    try:
        mod = importlib.import_module(f"stasis.forensics.criu_pb.{module}_pb2")
    except ImportError:
        raise ImageError("CRIU image decoders are missing: run 'bash scripts/criu-images.sh' "
                         "(part of 'make provision')") from None
    return getattr(mod, message)


def read_image(source: str | os.PathLike | bytes | BinaryIO, name: str = "", expect: str = "") -> Image:
    """Decode a whole image: a path, its bytes, or an open binary file (`name` labels errors).

    `expect` names the kind the caller needs (e.g. "core"); another kind is an error.
    """
    if isinstance(source, (str, os.PathLike)):
        name = name or os.path.basename(source)
        try:
            with open(source, "rb") as f:
                return read_image(f, name, expect)
        except OSError as e:
            raise ImageError(f"{name} cannot be read: {e.strerror or e}") from None
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    name = name or "image"
    kind = _read_magic(f, name)
    if expect and kind.name != expect:
        raise ImageError(f"{name} is not a {expect} image: it holds {kind.name} entries")
    image = Image(name, kind)
    entries, total = _entries(f, name, kind), 0
    if kind.head:
        image.head, total = next(entries, (None, 0))
        if image.head is None:
            raise ImageError(f"{name} is truncated: its {kind.head} is missing")
    for i, (entry, size, payload) in enumerate(_with_payloads(f, name, kind, entries)):
        total += size + len(payload or b"")
        if i >= MAX_ENTRIES or total > MAX_IMAGE:
            raise ImageError(f"{name} is too large: more than {MAX_ENTRIES} entries or {MAX_IMAGE} bytes")
        image.entries.append(entry)
        if payload is not None:
            image.payloads[i] = payload
    return image


def _read_magic(f: BinaryIO, name: str) -> Kind:
    raw = _read(f, 4, name)
    if len(raw) == 4 and struct.unpack("<I", raw)[0] == INVENTORY_MAGIC:
        return KINDS[INVENTORY_MAGIC]    # the inventory alone has no common magic
    raw += _read(f, 4, name)
    if len(raw) < 8:
        raise ImageError(f"{name} is truncated: {len(raw)} bytes, too short for a CRIU image header")
    common, magic = struct.unpack("<II", raw)
    if common not in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
        raise ImageError(f"{name} is not a CRIU image (magic {common:#010x})")
    kind = KINDS.get(magic)
    if kind is None or magic == INVENTORY_MAGIC:
        raise ImageError(f"{name} has an unknown or unsupported image magic {magic:#010x}")
    return kind


def _entries(f: BinaryIO, name: str, kind: Kind) -> Iterator[tuple[object, int]]:
    """(message, its size) for each entry after the magic, the pagemap head first."""
    head = message_class(kind.module, kind.head) if kind.head else None
    cls = message_class(kind.module, kind.message)
    index = 0
    while True:
        raw = _read(f, 4, name)
        if not raw:
            return
        index += 1
        if len(raw) < 4:
            raise ImageError(f"{name} is truncated: entry {index} has a {len(raw)}-byte size field")
        size = struct.unpack("<I", raw)[0]
        if size > MAX_ENTRY:
            raise ImageError(f"{name} is corrupt: entry {index} claims {size} bytes (limit {MAX_ENTRY})")
        data = _read(f, size, name)
        if len(data) < size:
            raise ImageError(f"{name} is truncated: entry {index} claims {size} bytes, {len(data)} remain")
        msg = (head if index == 1 and head else cls)()
        try:
            msg.ParseFromString(data)
            ok = msg.IsInitialized()
        except Exception as e:  # noqa: BLE001 - the protobuf runtime raises several types on bad input
            raise ImageError(f"{name} is corrupt: entry {index} is not a valid "
                             f"{type(msg).__name__} ({_first_line(e)})") from None
        if not ok:
            raise ImageError(f"{name} is corrupt: entry {index} lacks required fields of {type(msg).__name__}")
        yield msg, size


def _with_payloads(f: BinaryIO, name: str, kind: Kind, entries: Iterator) -> Iterator:
    for i, (entry, entry_size) in enumerate(entries, start=1 if not kind.head else 2):
        if not kind.payload:
            yield entry, entry_size, None
            continue
        size = sum(getattr(entry, n) for n in kind.payload)
        if size > MAX_PAYLOAD:
            raise ImageError(f"{name} is corrupt: entry {i} claims {size} bytes of data (limit {MAX_PAYLOAD})")
        data = _read(f, size, name)
        if len(data) < size:
            raise ImageError(f"{name} is truncated: entry {i} claims {size} bytes of data, {len(data)} remain")
        yield entry, entry_size, data


def _read(f: BinaryIO, n: int, name: str) -> bytes:
    try:
        return f.read(n)
    except OSError as e:
        raise ImageError(f"{name} cannot be read: {e.strerror or e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def dump_stats(data: bytes, name: str = "stats-dump") -> dict[str, int]:
    """CRIU's dump statistics (frozen time, pages written, ...) from a stats-dump image; {} without any."""
    entries = read_image(data, name, "stats").entries
    if not entries or not entries[0].HasField("dump"):
        return {}
    return {f.name: int(v) for f, v in entries[0].dump.ListFields()}
