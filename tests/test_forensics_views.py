"""The namespaces and socket-queue views (stasis.forensics.namespaces, .socket_queues): hand-made and damaged
images, then real checkpoints: podman's, and one of CRIU itself (runc never records a network namespace)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
import subprocess
import tarfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stasis.forensics import images
from stasis.forensics.images import IMG_COMMON_MAGIC, ImageError, read_image
from tests.conftest import require, require_criu_decoders

require_criu_decoders()

from stasis.forensics.criu_pb import (  # noqa: E402
    core_pb2,
    fdinfo_pb2,
    fown_pb2,
    inventory_pb2,
    ipc_var_pb2,
    mnt_pb2,
    netdev_pb2,
    pidns_pb2,
    pstree_pb2,
    sk_inet_pb2,
    sk_opts_pb2,
    sk_packet_pb2,
    tcp_stream_pb2,
    timens_pb2,
    userns_pb2,
    utsns_pb2,
)
from stasis.forensics.namespaces import IFADDR_MAGIC, ifaddrs, namespaces  # noqa: E402
from stasis.forensics.socket_queues import queued  # noqa: E402

MAGIC = {k.name: m for m, k in images.KINDS.items()}
IMAGE = "localhost/stasis-forensics:1"


def image(kind: str, *msgs, payloads: dict[int, bytes] | None = None) -> bytes:
    """An image file as CRIU writes it: magics, then size-prefixed entries (and raw bytes behind some)."""
    out = struct.pack("<I", MAGIC[kind]) if kind == "inventory" else struct.pack("<II", IMG_COMMON_MAGIC, MAGIC[kind])
    for i, m in enumerate(msgs):
        data = m.SerializeToString()
        out += struct.pack("<I", len(data)) + data + (payloads or {}).get(i, b"")
    return out


class Images:
    """The callables the views take, over {file name: bytes}, decoding as Checkpoint does."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    @classmethod
    def folder(cls, path) -> "Images":
        return cls({n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)
                    if n.endswith(".img") and not n.startswith("pages-")})

    def img(self, name: str, expect: str = ""):
        return read_image(self.files[name], name, expect) if name in self.files else None

    def names(self, pattern: str) -> list[str]:
        return sorted(n for n in self.files if re.fullmatch(pattern, n))

    def pids(self) -> list[int]:
        return [e.pid for e in self.img("pstree.img", "pstree").entries]

    def ids(self, pid: int):
        img = self.img(f"ids-{pid}.img", "ids")
        return img.entries[0] if img and img.entries else None

    def raw(self, name: str) -> bytes | None:
        return self.files.get(name)

    def namespaces(self) -> dict:
        return namespaces(self.img, self.names, self.pids, self.ids, self.raw)

    def queued(self) -> dict:
        return queued(self.img, self.names)


def ids(**ns) -> core_pb2.task_kobj_ids_entry:
    return core_pb2.task_kobj_ids_entry(vm_id=1, files_id=1, fs_id=1, sighand_id=1, **{f"{k}_ns_id": v
                                                                                       for k, v in ns.items()})


HOST = dict(pid=1, net=2, ipc=3, uts=4, mnt=6, user=7, cgroup=8, time=5)


def nl_addr(family: int, prefix: int, index: int, addr: bytes, kind: int = 20) -> bytes:
    """One RTM_NEWADDR netlink message as `ip addr save` writes it: ifaddrmsg, then IFA_LOCAL."""
    attr = struct.pack("<HH", 4 + len(addr), 2) + addr
    attr += b"\0" * (-len(attr) % 4)
    body = struct.pack("<BBBBI", family, prefix, 0x80, 0, index) + attr
    return struct.pack("<IHHII", 16 + len(body), kind, 2, 1, 0) + body


def ipc_var(**kw) -> ipc_var_pb2.ipc_var_entry:
    base = dict(sem_ctls=[32000, 1024000000, 500, 32000], msg_ctlmax=8192, msg_ctlmnb=16384, msg_ctlmni=32000,
                auto_msgmni=0, shm_ctlmax=1 << 40, shm_ctlall=1 << 41, shm_ctlmni=4096, shm_rmid_forced=0,
                mq_queues_max=256, mq_msg_max=10, mq_msgsize_max=8192)
    return ipc_var_pb2.ipc_var_entry(**{**base, **kw})


def mount(mnt_id: int, path: str) -> mnt_pb2.mnt_entry:
    return mnt_pb2.mnt_entry(fstype=1, mnt_id=mnt_id, root_dev=1, parent_mnt_id=1, flags=0, root="/",
                             mountpoint=path, source="none", options="")


def hand_made() -> Images:
    """pid 1 and its child 7 in a container's pid/net/ipc/mnt/user namespaces; 7 unshared its uts."""
    lo = netdev_pb2.net_device_entry(type=netdev_pb2.LOOPBACK, ifindex=1, mtu=65536, flags=0x10049, name="lo")
    eth = netdev_pb2.net_device_entry(type=netdev_pb2.VETH, ifindex=2, mtu=1500, flags=0x1002, name="eth0",
                                      address=bytes.fromhex("0242ac110002"), peer_ifindex=7)
    extent = userns_pb2.uid_gid_extent(first=0, lower_first=100000, count=65536)
    clock = timens_pb2.timespec
    return Images({
        "inventory.img": image("inventory", inventory_pb2.inventory_entry(img_version=2, root_ids=ids(**HOST))),
        "pstree.img": image("pstree", *(pstree_pb2.pstree_entry(pid=p, ppid=pp, pgid=1, sid=1, threads=[p])
                                        for p, pp in ((1, 0), (7, 1)))),
        "ids-1.img": image("ids", ids(**{**HOST, "pid": 9, "net": 10, "ipc": 11, "uts": 12, "mnt": 13, "user": 16})),
        "ids-7.img": image("ids", ids(**{**HOST, "pid": 9, "net": 10, "ipc": 11, "uts": 14, "mnt": 13, "user": 16})),
        "utsns-12.img": image("utsns", utsns_pb2.utsns_entry(nodename="web-1", domainname="(none)")),
        "utsns-14.img": image("utsns", utsns_pb2.utsns_entry(nodename="inner", domainname="example")),
        "netns-10.img": image("netns", netdev_pb2.netns_entry(nsids=[netdev_pb2.netns_id(target_ns_id=2,
                                                                                         netnsid_value=0)])),
        "netdev-10.img": image("netdev", eth, lo),
        "ifaddr-10.img": struct.pack("<I", IFADDR_MAGIC) + nl_addr(2, 8, 1, bytes([127, 0, 0, 1]))
        + nl_addr(3, 0, 0, b"", kind=3)            # not an address (NLMSG_DONE): skipped
        + nl_addr(10, 128, 1, bytes(15) + b"\1") + nl_addr(2, 16, 2, bytes([10, 88, 0, 5])),
        "ipcns-var-11.img": image("ipcns-var", ipc_var(msg_ctlmax=4096)),
        "mountpoints-13.img": image("mountpoints", mount(1, "/"), mount(2, "/proc"), mount(3, "/dev")),
        "userns-16.img": image("userns", userns_pb2.userns_entry(uid_map=[extent], gid_map=[extent])),
        "pidns-9.img": image("pidns", pidns_pb2.pidns_entry(ext_key="")),
        "timens-0.img": image("timens", timens_pb2.timens_entry(monotonic=clock(tv_sec=30, tv_nsec=5),
                                                               boottime=clock(tv_sec=31, tv_nsec=6))),
    })


# --- namespaces, hand-made ------------------------------------------------------------------------

def test_namespaces_group_pids_and_say_what_criu_recorded():
    doc = hand_made().namespaces()
    assert json.loads(json.dumps(doc)) == doc                   # plain JSON
    assert doc["root_ids"] == HOST and doc["pids_without_ids"] == []
    ns = doc["namespaces"]
    assert [(n["id"], n["own"], n["pids"]) for n in ns["uts"]] == [(12, True, [1]), (14, True, [7])]
    assert [(n["nodename"], n["domainname"]) for n in ns["uts"]] == [("web-1", "(none)"), ("inner", "example")]
    for kind, nsid in (("pid", 9), ("net", 10), ("ipc", 11), ("mnt", 13), ("user", 16)):
        assert [(n["id"], n["own"], n["pids"]) for n in ns[kind]] == [(nsid, True, [1, 7])], kind
    for kind in ("cgroup", "time"):
        assert [(n["id"], n["own"], n["pids"]) for n in ns[kind]] == [(HOST[kind], False, [1, 7])], kind
    net = ns["net"][0]
    assert net["images"] == ["netns-10.img", "netdev-10.img", "ifaddr-10.img"]
    assert net["external"] is None and net["nsids"] == [{"ns": 2, "nsid": 0}]
    assert net["interfaces"] == [
        {"ifindex": 1, "name": "lo", "type": "loopback", "mtu": 65536, "up": True,
         "flags": ["UP", "LOOPBACK", "RUNNING", "LOWER_UP"], "mac": None, "addresses": ["127.0.0.1/8", "::1/128"]},
        {"ifindex": 2, "name": "eth0", "type": "veth", "mtu": 1500, "up": False, "flags": ["BROADCAST", "MULTICAST"],
         "mac": "02:42:ac:11:00:02", "peer_ifindex": 7, "addresses": ["10.88.0.5/16"]}]
    assert ns["ipc"][0]["limits"]["msg_ctlmax"] == 4096 and ns["ipc"][0]["limits"]["sem"][2] == 500
    assert ns["mnt"][0]["mounts"] == 3
    assert ns["user"][0]["uid_map"] == ns["user"][0]["gid_map"] == [{"first": 0, "lower_first": 100000,
                                                                     "count": 65536}]
    assert ns["pid"][0]["external"] is None and ns["pid"][0]["images"] == ["pidns-9.img"]
    assert ns["time"][0]["clocks_at_dump"] == {"monotonic_ns": 30_000_000_005, "boottime_ns": 31_000_000_006}
    assert "uid_map" not in ns["cgroup"][0] and ns["cgroup"][0]["images"] == []


def test_namespaces_without_images_omit_what_is_unknown():
    fx = hand_made()
    for name in [n for n in fx.files if n not in ("pstree.img", "ids-1.img")]:
        del fx.files[name]
    doc = fx.namespaces()
    assert doc["root_ids"] is None and doc["pids_without_ids"] == [7]
    assert doc["namespaces"]["uts"] == [{"id": 12, "own": None, "pids": [1], "images": []}]
    assert doc["namespaces"]["net"] == [{"id": 10, "own": None, "pids": [1], "images": []}]
    # Without a raw reader, addresses are simply not reported.
    doc = namespaces(hand_made().img, hand_made().names, hand_made().pids, hand_made().ids)
    assert "addresses" not in doc["namespaces"]["net"][0]["interfaces"][0]


def test_a_namespace_seen_only_in_images_still_shows():
    fx = hand_made()
    fx.files["utsns-30.img"] = image("utsns", utsns_pb2.utsns_entry(nodename="orphan", domainname=""))
    assert fx.namespaces()["namespaces"]["uts"][-1] == {"id": 30, "own": True, "pids": [], "images": ["utsns-30.img"],
                                                         "nodename": "orphan", "domainname": ""}


@pytest.mark.parametrize("name,data,message", [
    ("utsns-12.img", image("utsns"), "utsns-12.img is truncated: it has no entry"),
    ("utsns-12.img", image("utsns")[:6], "utsns-12.img is truncated"),
    ("netdev-10.img", image("utsns", utsns_pb2.utsns_entry(nodename="x", domainname="y")),
     "netdev-10.img is not a netdev image: it holds utsns entries"),
    ("ipcns-var-11.img", image("ipcns-var") + struct.pack("<I", 3) + b"\xff\xff\xff", "ipcns-var-11.img is corrupt"),
    ("inventory.img", b"\x7fELF", "inventory.img is truncated"),
    ("ifaddr-10.img", b"\0\0\0\0", "ifaddr-10.img is not an iproute2 address dump"),
    ("ifaddr-10.img", struct.pack("<I", IFADDR_MAGIC) + nl_addr(2, 8, 1, b"\1\2\3\4")[:-3], "ifaddr-10.img is corrupt"),
    ("ifaddr-10.img", struct.pack("<I", IFADDR_MAGIC) + b"\1\2", "ifaddr-10.img is truncated"),
])
def test_corrupt_namespace_images_are_one_image_error_line(name, data, message):
    fx = hand_made()
    fx.files[name] = data
    with pytest.raises(ImageError) as err:
        fx.namespaces()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_ifaddr_only_raises_image_error(body):
    try:
        out = ifaddrs(struct.pack("<I", IFADDR_MAGIC) + body)
    except ImageError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(i, int) and all(isinstance(a, str) for a in v) for i, v in out.items())


# --- socket queues, hand-made ---------------------------------------------------------------------

def inet_file(fid: int, ino: int) -> fdinfo_pb2.file_entry:
    fown = fown_pb2.fown_entry(uid=0, euid=0, signum=0, pid_type=0, pid=0)
    opts = sk_opts_pb2.sk_opts_entry(so_sndbuf=1, so_rcvbuf=1, so_snd_tmo_sec=0, so_snd_tmo_usec=0,
                                     so_rcv_tmo_sec=0, so_rcv_tmo_usec=0)
    isk = sk_inet_pb2.inet_sk_entry(id=fid, ino=ino, family=2, type=1, proto=6, state=1, src_port=80, dst_port=5000,
                                    flags=2, backlog=0, fown=fown, opts=opts)
    return fdinfo_pb2.file_entry(type=fdinfo_pb2.INETSK, id=fid, isk=isk)


def tcp(inq: int, outq: int, unsent: int | None = None) -> tcp_stream_pb2.tcp_stream_entry:
    return tcp_stream_pb2.tcp_stream_entry(inq_len=inq, inq_seq=1, outq_len=outq, outq_seq=1, opt_mask=7,
                                           snd_wscale=7, mss_clamp=65495, unsq_len=unsent)


SECRET = b"do-not-leak-" + secrets.token_hex(8).encode()


def queues_fixture() -> Images:
    scm = [sk_packet_pb2.scm_entry(type=1, rights=[20, 21]), sk_packet_pb2.scm_entry(type=2, rights=[])]
    pkts = [sk_packet_pb2.sk_packet_entry(id_for=7, length=len(SECRET)),
            sk_packet_pb2.sk_packet_entry(id_for=7, length=3),
            sk_packet_pb2.sk_packet_entry(id_for=9, length=1, scm=scm)]
    return Images({
        "sk-queues.img": image("sk-queues", *pkts, payloads={0: SECRET, 1: b"abc", 2: b"x"}),
        "files.img": image("files", inet_file(14, 0x6fb54c)),
        "tcp-stream-6fb54c.img": image("tcp-stream", tcp(16, 0), payloads={0: SECRET[:16]}),
        "tcp-stream-a.img": image("tcp-stream", tcp(0, 9, 4), payloads={0: SECRET[:9]}),
    })


def test_queues_count_bytes_and_packets_never_the_data():
    doc = queues_fixture().queued()
    assert doc == {
        "by_id": {7: {"recv_queue_bytes": len(SECRET) + 3, "recv_queue_packets": 2, "fds_in_flight": 0},
                  9: {"recv_queue_bytes": 1, "recv_queue_packets": 1, "fds_in_flight": 2}},
        "tcp_by_inode": {0x6fb54c: {"id": 14, "recv_queue_bytes": 16, "send_queue_bytes": 0, "send_unsent_bytes": None},
                         10: {"id": None, "recv_queue_bytes": 0, "send_queue_bytes": 9, "send_unsent_bytes": 4}}}
    text = json.dumps(doc)
    assert SECRET.decode() not in text and "abc" not in text and SECRET[:9].decode() not in text


def test_no_queue_images_is_empty_not_an_error():
    assert Images({}).queued() == {"by_id": {}, "tcp_by_inode": {}}


@pytest.mark.parametrize("name,data,message", [
    ("sk-queues.img", image("sk-queues", sk_packet_pb2.sk_packet_entry(id_for=7, length=100), payloads={0: b"ab"}),
     "sk-queues.img is truncated: entry 1 claims 100 bytes of data, 2 remain"),
    ("sk-queues.img", image("sk-queues", sk_packet_pb2.sk_packet_entry(id_for=7, length=1 << 30)),
     "sk-queues.img is corrupt: entry 1 claims 1073741824 bytes of data"),
    ("tcp-stream-a.img", image("tcp-stream"), "tcp-stream-a.img is corrupt: 0 entries, CRIU writes one"),
    ("tcp-stream-a.img", image("tcp-stream", tcp(1, 0), tcp(1, 0), payloads={0: b"a", 1: b"b"}),
     "tcp-stream-a.img is corrupt: 2 entries"),
    ("files.img", b"garbage!", "files.img is not a CRIU image"),
])
def test_corrupt_queue_images_are_one_image_error_line(name, data, message):
    fx = queues_fixture()
    fx.files[name] = data
    with pytest.raises(ImageError) as err:
        fx.queued()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# --- a real podman checkpoint ---------------------------------------------------------------------

def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=180, check=check)


# syslogd's only output is a pipe that dd filled and nobody reads: its first line ("syslogd started")
# blocks it for good, so what logger sends stays queued in /dev/log. (SIGSTOP would be simpler, but
# CRIU hangs seizing a stopped task in a frozen cgroup-v1 freezer.) nc -e hands the accepted TCP
# connection to sleep, which never reads it; the client sends PAYLOAD and half-closes.
SCRIPT = ("{ dd if=/dev/zero bs=65536 count=1 2>/dev/null; exec syslogd -n -O -; } | sleep 1000 & "
          "while [ ! -S /dev/log ]; do usleep 50000; done; usleep 300000; "
          "for m in MESSAGES; do logger -t fx3 $m; done; "
          "nc -l -p 9000 -e sleep 1000 & "
          "while ! netstat -ltn | grep -q :9000; do usleep 50000; done; "
          "printf %s PAYLOAD | nc 127.0.0.1 9000 & "
          "while ! netstat -tn | grep -q CLOSE_WAIT; do usleep 50000; done; "
          "touch /tmp/fx3-ready; sleep 1000 & wait")
MESSAGES = ["one", "two-two", "three-three-three"]


@pytest.fixture(scope="module")
def podman_ckpt(real_stack, tmp_path_factory):
    """A --network none container named by --hostname, checkpointed with --tcp-established; its images
    unpacked, and what podman and the container itself said before the checkpoint."""
    from stasis.testbed.images import rootfs_tar

    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        podman("import", "--quiet", rootfs_tar(with_workload=False), IMAGE)
    tmp, payload = tmp_path_factory.mktemp("fx3-views"), secrets.token_hex(24)
    name, archive = f"fx3-{secrets.token_hex(4)}", str(tmp / "ckpt.tar")
    try:
        podman("run", "-d", "--network", "none", "--hostname", "fx3-host", "--name", name, IMAGE, "sh", "-c",
               SCRIPT.replace("MESSAGES", " ".join(MESSAGES)).replace("PAYLOAD", payload))
        deadline = time.monotonic() + 30
        while podman("exec", name, "test", "-e", "/tmp/fx3-ready", check=False).returncode != 0:
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr
            time.sleep(0.2)
        mounts = len(podman("exec", name, "cat", "/proc/1/mountinfo").stdout.splitlines())
        msgmax = int(podman("exec", name, "cat", "/proc/sys/kernel/msgmax").stdout)
        top = podman("top", name, "pid", "comm").stdout.splitlines()[1:]
        podman("container", "checkpoint", name, "--tcp-established", "--export", archive, "--compress", "none")
    finally:
        podman("rm", "-f", name, check=False)
    with tarfile.open(archive) as t:
        spec = json.load(t.extractfile("spec.dump"))
        t.extractall(tmp, [m for m in t.getmembers() if m.name.startswith("checkpoint/")], filter="data")
    return {"images": Images.folder(tmp / "checkpoint"), "archive": archive, "payload": payload, "mounts": mounts,
            "msgmax": msgmax, "pids": sorted(int(line.split()[0]) for line in top),
            "spec_ns": {ns["type"] for ns in spec["linux"]["namespaces"]}}


@pytest.mark.e2e
def test_real_namespaces_are_the_containers(podman_ckpt):
    fx = podman_ckpt["images"]
    doc, pids = fx.namespaces(), fx.pids()
    assert sorted(pids) == podman_ckpt["pids"] and doc["pids_without_ids"] == []
    ns = doc["namespaces"]
    for kind in ns:          # one namespace of each kind, holding every process
        assert [n["pids"] for n in ns[kind]] == [sorted(pids)], kind
    # The container's own namespaces are exactly those its OCI spec asked runc to create.
    spec_kinds = {"pid": "pid", "network": "net", "ipc": "ipc", "uts": "uts", "mount": "mnt", "user": "user",
                  "cgroup": "cgroup", "time": "time"}
    assert {k for k in ns if ns[k][0]["own"]} == {spec_kinds[t] for t in podman_ckpt["spec_ns"]}
    assert (ns["uts"][0]["nodename"], ns["uts"][0]["images"]) == ("fx3-host", [f"utsns-{ns['uts'][0]['id']}.img"])
    assert ns["mnt"][0]["mounts"] == podman_ckpt["mounts"]
    assert ns["ipc"][0]["limits"]["msg_ctlmax"] == podman_ckpt["msgmax"]
    # runc dumps the network namespace "empty": CRIU records no interfaces for it.
    assert ns["net"][0]["images"] == [] and "interfaces" not in ns["net"][0]
    assert ns["time"][0]["images"] == ["timens-0.img"] and ns["time"][0]["clocks_at_dump"]["boottime_ns"] > 0


@pytest.mark.e2e
def test_real_queues_hold_exactly_what_was_sent(podman_ckpt):
    fx = podman_ckpt["images"]
    doc = fx.queued()
    files = fx.img("files.img", "files").entries
    log = [f.id for f in files if f.HasField("usk") and bytes(f.usk.name).rstrip(b"\0") == b"/dev/log"]
    # glibc's syslog() sends "<13>Mmm dd hh:mm:ss fx3: MSG" (user.notice, a 15-character timestamp).
    sent = sum(len("<13>") + 16 + len("fx3: ") + len(m) for m in MESSAGES)
    assert doc["by_id"] == {log[0]: {"recv_queue_bytes": sent, "recv_queue_packets": len(MESSAGES), "fds_in_flight": 0}}
    isk = {f.isk.ino: f for f in files if f.HasField("isk")}
    server = [ino for ino, f in isk.items() if f.isk.src_port == 9000 and f.isk.state != 10]   # not the listener
    client = [ino for ino, f in isk.items() if f.isk.dst_port == 9000]
    assert sorted(doc["tcp_by_inode"]) == sorted(server + client)
    assert doc["tcp_by_inode"][server[0]] == {"id": isk[server[0]].id, "recv_queue_bytes": len(podman_ckpt["payload"]),
                                              "send_queue_bytes": 0, "send_unsent_bytes": 0}
    assert doc["tcp_by_inode"][client[0]]["recv_queue_bytes"] == 0
    text = json.dumps([doc, fx.namespaces()])
    assert podman_ckpt["payload"] not in text and "three-three" not in text


@pytest.mark.e2e
def test_checkpoint_methods_feed_the_views(podman_ckpt):
    """Checkpoint (the archive read in place) gives the same namespaces, and its sockets view carries
    the queued sizes: the /dev/log datagrams, the TCP payload nobody read."""
    from stasis.forensics.checkpoint import Checkpoint

    fx = podman_ckpt["images"]
    with Checkpoint.from_archive(podman_ckpt["archive"]) as ckpt:
        assert ckpt.namespaces() == namespaces(fx.img, fx.names, fx.pids, fx.ids)
        assert queued(ckpt._img, ckpt._names) == fx.queued()
        socks = ckpt.sockets()
    log = [k for k in socks if k["family"] == "unix" and k["address"] == "/dev/log"]
    sent = sum(len("<13>") + 16 + len("fx3: ") + len(m) for m in MESSAGES)
    assert [(k["recv_queue_bytes"], k["recv_queue_packets"]) for k in log] == [(sent, len(MESSAGES))]
    tcp = {k["ino"]: k for k in socks if k["family"] != "unix" and k["state"] != "LISTEN"}   # the client closed
    assert sorted(k["recv_queue_bytes"] for k in tcp.values()) == [0, len(podman_ckpt["payload"])]
    assert all(k["send_queue_bytes"] == 0 for k in tcp.values())


@pytest.mark.e2e
def test_damaged_real_images_only_raise_one_image_error_line(podman_ckpt):
    fx = podman_ckpt["images"]
    for name, original in sorted(fx.files.items()):
        for damaged in (original[:len(original) // 2], original[:8],
                        original[:8] + bytes(b ^ 0x5a for b in original[8:40]) + original[40:]):
            fx.files[name] = damaged
            try:
                fx.namespaces()
                fx.queued()
            except ImageError as e:
                assert "\n" not in str(e)
        fx.files[name] = original


# --- a network namespace CRIU records (plain CRIU, no runc) ---------------------------------------

@pytest.mark.e2e
def test_criu_recorded_network_namespace_shows_lo(real_stack, tmp_path):
    require(shutil.which("unshare") is not None and shutil.which("ip") is not None,
            "unshare and ip (util-linux, iproute2) are needed to dump a network namespace")
    busybox = shutil.which("busybox") or "/bin/busybox"
    ready, images_dir = tmp_path / "ready", tmp_path / "images"
    images_dir.mkdir()
    proc = subprocess.Popen(["unshare", "-n", "-u", busybox, "sh", "-c",
                             f"ip link set lo up && hostname fx3-criu && touch {ready} && exec {busybox} sleep 1000"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the namespaced shell did not start"
            time.sleep(0.05)
        dump = subprocess.run(["criu", "dump", "-t", str(proc.pid), "-D", str(images_dir), "-o", "dump.log"],
                              capture_output=True, text=True, timeout=120)
        assert dump.returncode == 0, (images_dir / "dump.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    doc = Images.folder(images_dir).namespaces()
    net, uts = doc["namespaces"]["net"], doc["namespaces"]["uts"]
    assert [(n["own"], n["pids"]) for n in net] == [(True, [proc.pid])]
    assert [(d["name"], d["type"], d["up"]) for d in net[0]["interfaces"]] == [("lo", "loopback", True)]
    assert "127.0.0.1/8" in net[0]["interfaces"][0]["addresses"]
    assert [(n["own"], n["nodename"]) for n in uts] == [(True, "fx3-criu")]
    assert [n["own"] for n in doc["namespaces"]["pid"]] == [False]
