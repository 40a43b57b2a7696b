"""The namespaces of a checkpoint: which processes share which, and what CRIU recorded about each.

A pure view over decoded images. The caller hands in how to get them, so any checkpoint source works:
  img(name, expect) -> Image | None   (None: the checkpoint lacks that file; ImageError: it is corrupt)
  names(regex)      -> sorted image file names that fully match
  pids()            -> the checkpoint's pids;  ids(pid) -> its TaskKobjIdsEntry or None
  raw(name)         -> bytes | None, optional: raw images (ifaddr-ID.img is iproute2's dump, not protobuf)

"own" means the namespace differs from the one CRIU itself ran in (inventory root_ids), i.e. the
container made it; False means it is the host's (inherited). runc dumps every container with its
network namespace "empty" (runc does not manage network devices), so podman checkpoints hold no
netns/netdev images: interfaces are then absent, not an empty list.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable

from stasis.forensics.images import ImageError

KINDS = ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time")

# Per kind: (image name prefix, image kind) of the images CRIU writes per namespace id.
IMAGES = {
    "pid": [("pidns", "pidns")],
    "net": [("netns", "netns"), ("netdev", "netdev")],
    "ipc": [("ipcns-var", "ipcns-var")],
    "uts": [("utsns", "utsns")],
    "mnt": [("mountpoints", "mountpoints")],
    "user": [("userns", "userns")],
    "time": [("timens", "timens")],
}
ND_TYPES = {1: "loopback", 2: "veth", 3: "tun", 4: "extlink", 5: "venet", 6: "bridge", 7: "macvlan", 8: "sit"}
IFF = ("UP", "BROADCAST", "DEBUG", "LOOPBACK", "POINTOPOINT", "NOTRAILERS", "RUNNING", "NOARP", "PROMISC",
       "ALLMULTI", "MASTER", "SLAVE", "MULTICAST", "PORTSEL", "AUTOMEDIA", "DYNAMIC", "LOWER_UP", "DORMANT", "ECHO")
IFADDR_MAGIC = 0x47361222      # iproute2's `ip addr save` header, which CRIU stores as ifaddr-ID.img
RTM_NEWADDR, IFA_ADDRESS, IFA_LOCAL = 20, 1, 2
MAX_RAW = 16 << 20


def namespaces(img: Callable, names: Callable, pids: Callable, ids: Callable, raw: Callable | None = None) -> dict:
    """{"root_ids": {kind: id} | None, "namespaces": {kind: [ns, ...]}, "pids_without_ids": [pid]}.

    Each ns: {"id", "own", "pids", "images"} plus what its images say (fields absent without them):
    uts nodename/domainname; net interfaces/external/nsids; ipc limits; user uid_map/gid_map;
    mnt mounts (count); pid external; time clocks (own) or clocks_at_dump (timens-0.img, not own).
    """
    inv = _one(img, "inventory.img", "inventory")
    root = inv.root_ids if inv is not None and inv.HasField("root_ids") else None
    members: dict[str, dict[int, list[int]]] = {k: {} for k in KINDS}
    missing = []
    for pid in pids():
        e = ids(pid)
        if e is None:
            missing.append(pid)
            continue
        for k in KINDS:
            if e.HasField(f"{k}_ns_id"):
                members[k].setdefault(getattr(e, f"{k}_ns_id"), []).append(pid)
    for k, kinds in IMAGES.items():      # a namespace with images but no member still shows
        for prefix, _ in kinds:
            for n in names(rf"{prefix}-\d+\.img"):
                if (nsid := int(n[len(prefix) + 1:-4])) != 0:    # timens-0: clocks, not a namespace
                    members[k].setdefault(nsid, [])
    out: dict[str, list] = {}
    for k in KINDS:
        out[k] = []
        for nsid in sorted(members[k]):
            field = f"{k}_ns_id"
            own = None if root is None or not root.HasField(field) else nsid != getattr(root, field)
            ns: dict[str, Any] = {"id": nsid, "own": own, "pids": sorted(members[k][nsid]), "images": []}
            for prefix, kind in IMAGES.get(k, ()):
                name = f"{prefix}-{nsid}.img"
                image = img(name, kind)
                if image is not None:
                    ns["images"].append(name)
                    ns.update(_DETAILS[kind](image, name))
            if k == "net" and raw is not None and ns["images"]:
                _add_addresses(ns, raw, f"ifaddr-{nsid}.img")
            if k == "time" and own is False and (t := _one(img, "timens-0.img", "timens")) is not None:
                ns["images"].append("timens-0.img")     # CRIU's clocks, for restore in a fresh timens
                ns["clocks_at_dump"] = _clocks(t)
            out[k].append(ns)
    return {"root_ids": {k: getattr(root, f"{k}_ns_id") for k in KINDS if root.HasField(f"{k}_ns_id")}
            if root is not None else None, "namespaces": out, "pids_without_ids": missing}


def _one(img: Callable, name: str, kind: str):
    """The single entry of a one-entry image, None without the file; an entry-less file is corrupt."""
    image = img(name, kind)
    return None if image is None else _first(image, name)


def _first(image, name: str):
    if not image.entries:
        raise ImageError(f"{name} is truncated: it has no entry")
    return image.entries[0]


def _uts(image, name: str) -> dict:
    e = _first(image, name)
    return {"nodename": e.nodename, "domainname": e.domainname}


def _netns(image, name: str) -> dict:
    e = _first(image, name)
    return {"external": e.ext_key or None, "nsids": [{"ns": n.target_ns_id, "nsid": n.netnsid_value} for n in e.nsids]}


def _netdev(image, name: str) -> dict:
    devs = []
    for d in image.entries:
        dev = {"ifindex": d.ifindex, "name": d.name, "type": ND_TYPES.get(d.type, str(d.type)), "mtu": d.mtu,
               "up": bool(d.flags & 1), "flags": [f for i, f in enumerate(IFF) if d.flags >> i & 1],
               "mac": bytes(d.address).hex(":") if d.HasField("address") else None}
        for f in ("peer_ifindex", "peer_nsid", "master"):
            if d.HasField(f):
                dev[f] = getattr(d, f)
        devs.append(dev)
    return {"interfaces": sorted(devs, key=lambda d: d["ifindex"])}


def _ipc(image, name: str) -> dict:
    e = _first(image, name)
    fields = ("msg_ctlmax", "msg_ctlmnb", "msg_ctlmni", "shm_ctlmax", "shm_ctlall", "shm_ctlmni", "shm_rmid_forced",
              "mq_queues_max", "mq_msg_max", "mq_msgsize_max")
    return {"limits": {**{f: getattr(e, f) for f in fields}, "sem": list(e.sem_ctls)}}


def _user(image, name: str) -> dict:
    e = _first(image, name)
    def ext(m):
        return [{"first": x.first, "lower_first": x.lower_first, "count": x.count} for x in m]
    return {"uid_map": ext(e.uid_map), "gid_map": ext(e.gid_map)}


def _clocks(e) -> dict:
    return {f"{c}_ns": getattr(e, c).tv_sec * 10**9 + getattr(e, c).tv_nsec for c in ("monotonic", "boottime")}


_DETAILS: dict[str, Callable[[Any, str], dict]] = {
    "utsns": _uts, "netns": _netns, "netdev": _netdev, "ipcns-var": _ipc, "userns": _user,
    "mountpoints": lambda image, name: {"mounts": len(image.entries)},
    "pidns": lambda image, name: {"external": _first(image, name).ext_key or None},
    "timens": lambda image, name: {"clocks": _clocks(_first(image, name))},
}


def _add_addresses(ns: dict, raw: Callable, name: str) -> None:
    data = raw(name)
    if data is None:
        return
    ns["images"].append(name)
    by_index = ifaddrs(data, name)
    for dev in ns.get("interfaces", ()):
        dev["addresses"] = by_index.get(dev["ifindex"], [])


def ifaddrs(data: bytes, name: str = "ifaddr.img") -> dict[int, list[str]]:
    """ifindex -> ["addr/prefix", ...] from iproute2's saved RTM_NEWADDR netlink messages."""
    if len(data) > MAX_RAW:
        raise ImageError(f"{name} is too large: {len(data)} bytes (limit {MAX_RAW})")
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != IFADDR_MAGIC:
        raise ImageError(f"{name} is not an iproute2 address dump")
    out: dict[int, list[str]] = {}
    pos = 4
    while pos < len(data):
        if len(data) - pos < 16:
            raise ImageError(f"{name} is truncated: a netlink header at byte {pos}")
        length, kind = struct.unpack_from("<IH", data, pos)
        if length < 16 or length > len(data) - pos:
            raise ImageError(f"{name} is corrupt: a netlink message at byte {pos} claims {length} bytes")
        if kind == RTM_NEWADDR and length >= 24:
            family, prefix, _, _, index = struct.unpack_from("<BBBBI", data, pos + 16)
            attrs, a = {}, pos + 24
            while a + 4 <= pos + length:
                alen, atype = struct.unpack_from("<HH", data, a)
                if alen < 4 or a + alen > pos + length:
                    raise ImageError(f"{name} is corrupt: an address attribute at byte {a} claims {alen} bytes")
                attrs[atype] = data[a + 4:a + alen]
                a += (alen + 3) & ~3
            addr = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if addr is not None:
                out.setdefault(index, []).append(f"{_ntop(family, addr)}/{prefix}")
        pos += (length + 3) & ~3
    return out


def _ntop(family: int, addr: bytes) -> str:
    try:
        return socket.inet_ntop(family, addr)
    except (OSError, ValueError):
        return addr.hex()
