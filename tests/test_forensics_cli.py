"""`stasis inspect` and `stasis grep`: archive member validation, hostile archives, and a real checkpoint
read back from a repository."""

from __future__ import annotations

import argparse
import codecs
import io
import json
import os
import secrets
import subprocess
import tarfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_criu_decoders

require_criu_decoders()

from stasis.controller import cli, forensics_cli  # noqa: E402
from stasis.forensics import archive as fx  # noqa: E402
from stasis.forensics.checkpoint import ArchiveError, Checkpoint, check_member  # noqa: E402
from stasis.storage.manifest import ContainerRef, Manifest  # noqa: E402
from stasis.storage.repository import Repository, new_checkpoint_id, now_rfc3339  # noqa: E402

PASSWORD = "forensics pw"


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr("stasis.storage.keys.SCRYPT_N", 1 << 10)


def build_parser() -> argparse.ArgumentParser:
    """The real CLI's parser shape, with only the forensics commands registered."""
    parser = argparse.ArgumentParser(prog="stasis", parents=[cli._common(defaults=True)])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = cli._common(defaults=False)

    def add(name, help, fn, **kw):
        p = sub.add_parser(name, help=help, description=help, parents=[common], **kw)
        p.set_defaults(fn=fn)
        return p

    forensics_cli.add_commands(sub, common, add)
    return parser


@pytest.fixture
def stasis(monkeypatch, capsys):
    """Run `stasis ARGS` through cli.main (its error handling) with the forensics commands registered."""
    monkeypatch.setattr(cli, "build_parser", build_parser)
    monkeypatch.setenv("STASIS_PASSWORD", PASSWORD)

    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli.main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def store(repo: Repository, archive: str, name: str = "web", image: str | None = None) -> Manifest:
    """What the agent's _checkpoint does after the dump: store the archive (and the image's
    docker-archive, if given), commit a manifest."""
    m = Manifest(id=new_checkpoint_id(), created=now_rfc3339(), host="host-a", runtime="podman",
                 runtime_version="5", criu_version="4.1.1", container=ContainerRef("c" * 64, name, "img", "d" * 64),
                 leave_running=True, checkpoint=repo.store_file(archive),
                 image=repo.store_file(image) if image else None, timings={}, criu_stats={})
    repo.write_manifest(m)
    return m


# --- member validation ------------------------------------------------------------------------------

def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize("name,target", [
    ("checkpoint/core-1.img", "checkpoint/core-1.img"),
    ("./checkpoint/pages-1.img", "checkpoint/pages-1.img"),
    ("checkpoint/tmpfs-dev-80.tar.gz.img", "checkpoint/tmpfs-dev-80.tar.gz.img"),
    ("stats-dump", "stats-dump"), ("config.dump", "config.dump"), ("spec.dump", "spec.dump"),
    ("deleted.files", "deleted.files"), ("rootfs-diff.tar", "rootfs-diff.tar"),
    ("checkpoint/descriptors.json", None), ("network.status", None), ("ctr.log", None),
    ("checkpoint/.hidden.img", None), ("checkpoint/sub/core-1.img", None), ("artifacts/x.img", None),
    ("devshm-checkpoint.tar", None),
])
def test_only_wanted_regular_files_are_extracted(name, target):
    assert check_member(member(name)) == target
    assert check_member(member("checkpoint/", tarfile.DIRTYPE)) is None


@pytest.mark.parametrize("info,message", [
    (member("/etc/cron.d/evil"), "absolute member name '/etc/cron.d/evil'"),
    (member("../x"), "member '../x' that climbs out"),
    (member("checkpoint/../../x.img"), "climbs out"),
    (member("checkpoint/core-1.img", tarfile.SYMTYPE, link="/etc/shadow"), "a link 'checkpoint/core-1.img'"),
    (member("stats-dump", tarfile.LNKTYPE, link="etc/passwd"), "a link 'stats-dump'"),
    (member("checkpoint/x.img", tarfile.CHRTYPE), "a device, fifo or special member"),
    (member("checkpoint/x.img", tarfile.FIFOTYPE), "a device, fifo or special member"),
    (member("config.dump", size=1 << 30), "config.dump is 1073741824 bytes (limit"),
    (member("checkpoint/pages-1.img", size=fx.MAX_MEMBER + 1), "is 68719476737 bytes (limit"),
])
def test_hostile_members_are_refused(info, message):
    with pytest.raises(ArchiveError, match="^the checkpoint archive") as err:
        check_member(info)
    assert message in str(err.value) and "\n" not in str(err.value)


NAMES = st.lists(st.sampled_from(["checkpoint", "..", ".", "", "core-1.img", "stats-dump", "a", "x.img", "/"]),
                 min_size=1, max_size=5).map("/".join) | st.text(max_size=40)
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                         tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NAMES, KINDS, st.integers(0, 1 << 40))
def test_fuzz_member_checks_never_let_a_path_out(name, kind, size):
    try:
        target = check_member(member(name, kind, size, link="x"))
    except ArchiveError as e:
        assert "\n" not in str(e)
        return
    if target is None:
        return
    assert not target.startswith("/") and ".." not in target.split("/") and "" not in target.split("/")
    assert target in fx.TOP_FILES or fx.IMG_NAME.fullmatch(target)
    assert kind in (tarfile.REGTYPE, tarfile.CONTTYPE) and size <= fx.MAX_MEMBER


# --- hostile archives -------------------------------------------------------------------------------

def hostile_tar(path, bad: tarfile.TarInfo) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in (("checkpoint/pstree.img", b"x"), ("stats-dump", b"y")):
            info = member(name, size=len(data))
            t.addfile(info, io.BytesIO(data))
        t.addfile(bad, io.BytesIO(b"pwned" if bad.isfile() else b""))
    return str(path)


HOSTILE = {
    "dotdot": lambda: member("../fx2-escaped", size=5),
    "absolute": lambda: member("/tmp/fx2-absolute-escape", size=5),
    "symlink": lambda: member("checkpoint/core-1.img", tarfile.SYMTYPE, link="/etc/passwd"),
    "nested": lambda: member("checkpoint/../../fx2-escaped.img", size=5),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archives_are_refused_with_nothing_written(kind, tmp_path):
    archive = hostile_tar(tmp_path / "evil.tar", HOSTILE[kind]())
    before = set(os.listdir(tmp_path))
    with pytest.raises(ArchiveError, match="^the checkpoint archive has") as err:
        Checkpoint.from_archive(archive)
    assert "\n" not in str(err.value)
    assert set(os.listdir(tmp_path)) == before       # read in place: nothing is ever unpacked
    assert not os.path.exists("/tmp/fx2-absolute-escape") and not os.path.exists(tmp_path / "fx2-escaped")


def test_garbage_and_non_checkpoints_are_refused(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(ArchiveError, match="^the checkpoint archive is not a readable tar file"):
        Checkpoint.from_archive(str(junk))
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(ArchiveError, match="no checkpoint/pstree.img"):
        Checkpoint.from_archive(str(tmp_path / "empty.tar"))
    assert sorted(os.listdir(tmp_path)) == ["empty.tar", "junk.tar"]


def test_cli_errors_are_one_line(tmp_path, stasis):
    repo = Repository.init(f"file://{tmp_path}/repo", PASSWORD)
    bad = store(repo, hostile_tar(tmp_path / "evil.tar", HOSTILE["dotdot"]()))
    rc, out, err = stasis("inspect", bad.id, "--repo", repo.url)
    assert rc == 1 and out == "" and err.startswith("stasis: error: the checkpoint archive has a member '../fx2")
    assert err.count("\n") == 1 and not (tmp_path.parent / "fx2-escaped").exists()
    rc, _, err = stasis("grep", "0123456789abcdef", "x", "--repo", repo.url)
    assert rc == 1 and err == f"stasis: error: no checkpoint '0123456789abcdef' in {repo.url}\n"
    rc, _, err = stasis("inspect", "zz", "--repo", repo.url)
    assert rc == 2 and "malformed" in err and err.count("\n") == 1
    rc, _, err = stasis("import", str(tmp_path / "evil.tar"), "--repo", repo.url,
                        "--workdir", str(tmp_path / "nowhere"))
    assert rc == 2 and err == f"stasis: error: --workdir {tmp_path}/nowhere: no such folder\n"
    rc, _, err = stasis("inspect", bad.id, "--repo", "")
    assert rc == 2 and err.startswith("stasis: error: name the repository")
    assert [p for p in os.listdir(tmp_path) if p.startswith("stasis-")] == []


# --- a real checkpoint, through a repository --------------------------------------------------------

IMAGE = "localhost/stasis-forensics:1"


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=180, check=check)


def checkpoint_container(script: str, env: dict[str, str], archive: str) -> tuple[str, dict]:
    """Run `sh -c script` in a fresh fx2- container (no network), wait for its `sleep`, checkpoint it to
    `archive`, remove it; the container's name and its processes as podman top saw them."""
    from stasis.testbed.images import rootfs_tar

    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        podman("import", "--quiet", rootfs_tar(with_workload=False), IMAGE)
    name = f"fx2-{secrets.token_hex(4)}"
    try:
        podman("run", "-d", "--network", "none", "--name", name, *(f"-e={k}={v}" for k, v in env.items()), IMAGE,
               "sh", "-c", script)
        deadline = time.monotonic() + 30
        while "sleep" not in (top := podman("top", name, "pid", "ppid", "comm", check=False).stdout):
            assert time.monotonic() < deadline, f"the container's processes never started: {top}"
            time.sleep(0.2)
        procs = {int(f[0]): (int(f[1]), f[2]) for f in (line.split() for line in top.splitlines()[1:])}
        podman("container", "checkpoint", name, "--export", archive, "--compress", "none")
    finally:
        podman("rm", "-f", name, check=False)
    return name, procs


@pytest.fixture(scope="module")
def stored(real_stack, tmp_path_factory):
    """A checkpoint of `sh` (pid 1, fd 3 open on /etc/passwd) and its `sleep` child, with a secret in the
    environment and one only in sh's heap, that created /tmp/fx2-marker, replaced /bin/false and deleted
    /bin/arch; stored with its image in a fresh encrypted file repository as the agent stores one."""
    tmp = tmp_path_factory.mktemp("fx2")
    env_secret, heap_secret = f"envsecret-{secrets.token_hex(8)}", f"heapsecret-{secrets.token_hex(8)}"
    script = (f"echo fx2-marker-data > /tmp/fx2-marker; rm /bin/arch; ln -sf busybox /bin/false; "
              f"exec 3</etc/passwd; S=$(echo {codecs.encode(heap_secret, 'rot13')} | tr a-z n-za-m); sleep 1000 & wait")
    archive = str(tmp / "ckpt.tar")
    name, procs = checkpoint_container(script, {"FX_SECRET": env_secret}, archive)
    image = str(tmp / "image.tar")
    podman("save", "--quiet", "--format", "docker-archive", "-o", image, IMAGE)
    repo = Repository.init(f"file://{tmp}/repo", PASSWORD)
    manifest = store(repo, archive, name, image)
    return {"repo": repo, "manifest": manifest, "procs": procs, "env": env_secret, "heap": heap_secret,
            "script": script, "name": name, "tmp": tmp, "archive_size": os.path.getsize(archive)}


@pytest.mark.e2e
def test_inspect_shows_exactly_the_truth(stored, stasis):
    m, procs = stored["manifest"], stored["procs"]
    rc, out, err = stasis("inspect", m.id[:8], "--repo", stored["repo"].url, "--all", "--json")
    assert rc == 0, err
    doc = json.loads(out)

    s = doc["summary"]
    assert s["checkpoint"] == m.id and s["container"]["name"] == stored["name"] and s["host"] == "host-a"
    assert s["criu_version"] == "4.1.1" and s["processes"] == 2
    assert s["sizes"]["archive_bytes"] == stored["archive_size"] and s["sizes"]["memory_pages"] > 0
    assert s["sizes"]["memory_pages"] == doc["stats"]["pages_written"]

    ps = {p["pid"]: p for p in doc["processes"]}
    assert {pid: (p["ppid"], p["comm"]) for pid, p in ps.items()} == procs
    sh = next(pid for pid, p in ps.items() if p["ppid"] == 0)
    sleep = next(pid for pid, p in ps.items() if p["ppid"] == sh)
    assert ps[sh]["comm"] == "sh" and ps[sleep]["comm"] == "sleep"
    assert all(p["state"] == "alive" and p["uid"] == 0 and p["gid"] == 0 for p in ps.values())
    assert ps[sh]["argv"] == ["sh", "-c", stored["script"]] and ps[sleep]["argv"] == ["sleep", "1000"]
    for p in ps.values():
        assert f"FX_SECRET={stored['env']}" in p["env"]
        assert not any(stored["heap"] in e for e in p["env"] + p["argv"])

    files = {f["pid"]: f for f in doc["files"]}
    for pid in (sh, sleep):
        fds = {fd["fd"]: (fd["type"], fd["path"]) for fd in files[pid]["fds"]}
        assert fds[0] == ("REG", "/dev/null") and fds[3] == ("REG", "/etc/passwd")
        assert fds[1][0] == "PIPE" and fds[1][1].startswith("pipe:[")
        assert files[pid]["exe"] == "/bin/busybox" and files[pid]["cwd"] == "/" and files[pid]["root"] == "/"
    assert doc["sockets"] == []                       # --network none, and nothing opened one
    spaces = doc["namespaces"]["namespaces"]
    for kind in ("pid", "mnt", "uts", "ipc", "net"):  # the container's own, holding both processes
        assert [(x["own"], x["pids"]) for x in spaces[kind]] == [(True, sorted(procs))], kind
    assert spaces["mnt"][0]["mounts"] == len(doc["mounts"])

    assert any(x["mountpoint"] == "/" and x["fstype"] == "overlayfs" for x in doc["mounts"])
    assert any(x["mountpoint"] == "/proc" for x in doc["mounts"])
    for p in doc["maps"]:
        assert any(v["mapping"] == "/bin/busybox" and v["perms"] == "r-xp" for v in p["maps"])
        assert any(v["mapping"] == "[stack]" for v in p["maps"])
    assert doc["stats"]["frozen_time"] > 0

    changed = {f["path"]: f for f in doc["fs"]["changed"]}
    assert changed["/tmp/fx2-marker"]["size"] == len("fx2-marker-data\n")
    assert doc["fs"]["image_compared"] and changed["/tmp/fx2-marker"]["change"] == "added"
    assert changed["/bin/false"] == {"path": "/bin/false", "type": "symlink", "size": 0, "mode": "0777",
                                     "target": "busybox", "change": "modified"}
    assert {f["change"] for f in changed.values()} == {"added", "modified"}
    assert doc["fs"]["deleted"] == ["/bin/arch"] and doc["fs"]["refused_deletions"] == []

    rc, out, _ = stasis("inspect", m.id, "--repo", stored["repo"].url, "--all")
    assert rc == 0 and f"container    {stored['name']}" in out and "/etc/passwd" in out and "FX_SECRET=" in out
    rc, out, _ = stasis("inspect", m.id, "--repo", stored["repo"].url, "--json")
    assert rc == 0 and list(json.loads(out)) == ["summary"]


@pytest.mark.e2e
def test_grep_finds_the_heap_secret(stored, stasis):
    m, heap = stored["manifest"], stored["heap"]
    url = stored["repo"].url
    rc, out, err = stasis("grep", m.id, heap, "--repo", url, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    sh = next(pid for pid, (ppid, _) in stored["procs"].items() if ppid == 0)
    assert doc["hits"] and {h["pid"] for h in doc["hits"]} == {sh}
    for h in doc["hits"]:
        start, end = (int(x, 16) for x in h["vma"])
        assert start <= int(h["vaddr"], 16) < end and h["mapping"] == "[heap]" and h["match"] == heap
        assert heap[:8] in "".join(line.split("|")[1] for line in h["hexdump"])

    rc, out, _ = stasis("grep", m.id, r"envsecret-[0-9a-f]{16}", "--regex", "--repo", url, "--json")
    hits = json.loads(out)["hits"]
    assert rc == 0 and {h["pid"] for h in hits} == set(stored["procs"]) and hits[0]["match"] == stored["env"]

    sleep = next(pid for pid, (ppid, _) in stored["procs"].items() if ppid != 0)
    rc, out, _ = stasis("grep", m.id, heap, "--pid", str(sleep), "--repo", url)
    assert rc == 1 and out.strip() == "0 hits"          # the child never decoded it
    rc, out, _ = stasis("grep", m.id, heap, "--context", "16", "--repo", url)
    assert rc == 0 and f"pid {sh} (sh) at 0x" in out and "[heap] rw-p" in out
    rc, _, err = stasis("grep", m.id, "x", "--pid", "99999", "--repo", url)
    assert rc == 2 and "has no process 99999" in err
    rc, _, err = stasis("grep", m.id, "(", "--regex", "--repo", url)
    assert rc == 2 and "not a valid regular expression" in err


@pytest.mark.e2e
def test_sockets_show_addresses_ports_state_and_holders(real_stack, tmp_path, stasis):
    archive = str(tmp_path / "ckpt.tar")
    _, procs = checkpoint_container("httpd -f -p 127.0.0.1:8080 & syslogd -n -O /dev/null & sleep 1000 & wait",
                                    {}, archive)
    repo = Repository.init(f"file://{tmp_path}/repo", PASSWORD)
    m = store(repo, archive)
    rc, out, err = stasis("inspect", m.id, "--repo", repo.url, "--sockets", "--json")
    assert rc == 0, err
    by_comm = {comm: pid for pid, (_, comm) in procs.items()}
    socks = sorted(json.loads(out)["sockets"], key=lambda k: k["family"])
    assert [(k["family"], k["type"], k["state"]) for k in socks] == [("inet", "stream", "LISTEN"),
                                                                      ("unix", "dgram", "CLOSE")]
    tcp, unix = socks
    assert (tcp["proto"], tcp["local"], tcp["local_port"]) == ("tcp", "127.0.0.1", 8080)
    assert [h["pid"] for h in tcp["held_by"]] == [by_comm["httpd"]]
    assert unix["address"] == "/dev/log" and [h["pid"] for h in unix["held_by"]] == [by_comm["syslogd"]]


def test_garbage_images_are_one_line_errors(tmp_path, stasis):
    with tarfile.open(tmp_path / "junk.tar", "w") as t:
        data = b"\x7fELF" + bytes(60)
        t.addfile(member("checkpoint/pstree.img", size=len(data)), io.BytesIO(data))
    repo = Repository.init(f"file://{tmp_path}/repo", PASSWORD)
    m = store(repo, str(tmp_path / "junk.tar"))
    rc, out, err = stasis("inspect", m.id, "--repo", repo.url, "--all")
    assert rc == 1 and out == "" and err == "stasis: error: pstree.img is not a CRIU image (magic 0x464c457f)\n"


def all_views(ckpt: Checkpoint) -> None:
    ckpt.summary()
    ckpt.processes(cmdline=True, env=True)
    for view in (ckpt.files, ckpt.sockets, ckpt.mounts, ckpt.maps, ckpt.stats, ckpt.fs):
        view()
    ckpt.grep("secret")


@pytest.mark.e2e
def test_damaged_real_images_only_raise_one_line_errors(stored, tmp_path):
    """Every image of the real checkpoint, truncated or bit-flipped in turn: each view fails with one
    StasisError line or still works; never another exception."""
    from stasis.errors import StasisError

    with tarfile.open(stored["tmp"] / "ckpt.tar") as t:    # the test's own archive: trusted
        t.extractall(tmp_path / "unpacked", filter="data")
    root = tmp_path / "unpacked"
    with Checkpoint(str(root)) as ckpt:
        all_views(ckpt)
        names = ["checkpoint/" + n for n in sorted(os.listdir(root / "checkpoint"))]
        for name in names + ["stats-dump", "deleted.files", "rootfs-diff.tar"]:
            path = root / name
            if not path.exists():
                continue
            original = path.read_bytes()
            for damaged in (original[:len(original) // 2], original[:8] + bytes(b ^ 0x5a for b in original[8:40])
                            + original[40:], b"[1, {}]" if name.endswith(".files") else b""):
                path.write_bytes(damaged)
                ckpt._cache.clear()
                try:
                    all_views(ckpt)
                except StasisError as e:
                    assert "\n" not in str(e)
            path.write_bytes(original)


# --- dump-file, dump-memory, diff, export, import (fx3) ---------------------------------------------

def fake_checkpoint(root, members: list[tuple[tarfile.TarInfo, bytes]]) -> Checkpoint:
    """A Checkpoint whose rootfs-diff.tar holds exactly `members` (no CRIU images: dump_file needs none)."""
    os.makedirs(root / "checkpoint", exist_ok=True)
    with tarfile.open(root / "rootfs-diff.tar", "w") as t:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            t.addfile(info, io.BytesIO(data))
    (root / "deleted.files").write_text('["/etc/gone"]')
    return Checkpoint(str(root))


def test_dump_file_copies_regular_files_only(tmp_path):
    from stasis.errors import FailedPrecondition, InvalidArgument, NotFound

    ckpt = fake_checkpoint(tmp_path / "ck", [
        (member("tmp/a.txt"), b"first"), (member("./tmp/a.txt"), b"second"),      # the last one wins
        (member("tmp/link", tarfile.SYMTYPE, link="/etc/shadow"), b""),
        (member("tmp/hard", tarfile.LNKTYPE, link="tmp/a.txt"), b""),
        (member("tmp/dir", tarfile.DIRTYPE), b""), (member("tmp/fifo", tarfile.FIFOTYPE), b""),
        (member("tmp/../etc/sneaky"), b"x"), (member("tmp/big"), b"y" * 100)])
    out = io.BytesIO()
    doc = ckpt.dump_file("/tmp//a.txt", out)
    assert out.getvalue() == b"second" and doc["path"] == "/tmp/a.txt" and doc["size"] == 6
    for path, error, message in (
            ("/tmp/link", FailedPrecondition, "is a symlink to '/etc/shadow'"),
            ("/tmp/hard", FailedPrecondition, "is a hard link to 'tmp/a.txt'"),
            ("/tmp/dir", FailedPrecondition, "is a dir in the checkpoint, not a regular file"),
            ("/tmp/fifo", FailedPrecondition, "is a fifo in the checkpoint"),
            ("/etc/sneaky", NotFound, "is not among the checkpoint's changed files"),   # '..' members never match
            ("/etc/gone", NotFound, "was deleted in the container"),
            ("tmp/a.txt", InvalidArgument, "give the file's absolute path"),
            ("/tmp/../etc/passwd", InvalidArgument, "has no '..'")):
        with pytest.raises(error) as err:
            ckpt.dump_file(path, io.BytesIO())
        assert message in str(err.value), (path, str(err.value))
    with pytest.raises(FailedPrecondition, match="is 100 bytes, over the limit of 99"):
        ckpt.dump_file("/tmp/big", io.BytesIO(), limit=99)


def test_safe_output_never_follows_or_clobbers(tmp_path):
    from stasis.errors import AlreadyExists
    from stasis.forensics.export_import import safe_output

    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "out"
    link.symlink_to(victim)
    with pytest.raises(AlreadyExists, match="exists: give --force"):
        with safe_output(str(link)) as (f, _):
            f.write(b"x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(AlreadyExists):
        with safe_output(str(dangling)) as (f, _):
            f.write(b"x")
    assert not (tmp_path / "nowhere").exists()
    with safe_output(str(link), force=True) as (f, _):
        f.write(b"new")
    assert victim.read_text() == "precious" and not link.is_symlink() and link.read_bytes() == b"new"
    assert oct(link.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(RuntimeError):
        with safe_output(str(tmp_path / "half")) as (f, _):
            f.write(b"partial")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["dangling", "out", "victim"]


@pytest.mark.e2e
def test_dump_file_and_dump_memory(stored, stasis, tmp_path):
    m, url = stored["manifest"], stored["repo"].url
    out = tmp_path / "marker"
    rc, text, err = stasis("dump-file", m.id, "/tmp/fx2-marker", "-o", str(out), "--repo", url)
    assert rc == 0, err
    assert out.read_bytes() == b"fx2-marker-data\n" and f"to {out}: 16 bytes, mode 0644" in text
    rc, _, err = stasis("dump-file", m.id, "/tmp/fx2-marker", "-o", str(out), "--repo", url)
    assert rc == 1 and err == f"stasis: error: {out} exists: give --force to replace it\n"
    rc, text, _ = stasis("dump-file", m.id, "/tmp/fx2-marker", "-o", str(out), "--force", "--json", "--repo", url)
    assert rc == 0 and json.loads(text)["sha256"] == __import__("hashlib").sha256(b"fx2-marker-data\n").hexdigest()
    rc, _, err = stasis("dump-file", m.id, "/bin/arch", "-o", str(tmp_path / "arch"), "--repo", url)
    assert rc == 1 and err == "stasis: error: /bin/arch was deleted in the container: the checkpoint has no " \
                              "content for it\n"
    assert sorted(os.listdir(tmp_path)) == ["marker"]          # a failure leaves nothing behind

    rc, text, _ = stasis("grep", m.id, stored["heap"], "--json", "--repo", url)
    hit = json.loads(text)["hits"][0]
    vma_start, vma_end = (int(x, 16) for x in hit["vma"])
    rc, text, err = stasis("dump-memory", m.id, "--pid", str(hit["pid"]), "--addr", hit["vaddr"], "--len", "32",
                           "-o", str(tmp_path / "secret.bin"), "--json", "--repo", url)
    assert rc == 0, err
    doc = json.loads(text)
    assert (tmp_path / "secret.bin").read_bytes()[:len(stored["heap"])] == stored["heap"].encode()
    assert doc["missing"] == [] and doc["dumped_bytes"] == 32 and doc["mappings"][0]["mapping"] == "[heap]"
    # The whole heap and a page past its end: untouched heap pages are "not dumped", past the end "not mapped".
    span = vma_end - vma_start + 4096
    rc, text, err = stasis("dump-memory", m.id, "--pid", str(hit["pid"]), "--addr", hex(vma_start), "--len",
                           str(span), "-o", str(tmp_path / "heap.bin"), "--repo", url, "--json")
    assert rc == 0, err
    doc = json.loads(text)
    assert os.path.getsize(tmp_path / "heap.bin") == span
    assert doc["missing"][-1] == {"start": hex(vma_end), "end": hex(vma_end + 4096), "length": 4096,
                                  "why": "not mapped", "mapping": None}
    assert doc["dumped_bytes"] == span - sum(x["length"] for x in doc["missing"]) > 0
    data = (tmp_path / "heap.bin").read_bytes()
    for x in doc["missing"]:
        assert data[int(x["start"], 16) - vma_start:int(x["end"], 16) - vma_start].count(0) == x["length"]
    rc, text, _ = stasis("dump-memory", m.id, "--pid", str(hit["pid"]), "--addr", hex(vma_start), "--len",
                         str(span), "-o", str(tmp_path / "heap2.bin"), "--repo", url)
    assert rc == 0 and f"zeros  {hex(vma_end)}-{hex(vma_end + 4096)} (4096 bytes): not mapped" in text
    for args, message in ((("--len", str(2 << 30)), "--len must be 1 to 1073741824 bytes"),
                          (("--len", "ten"), "--len 'ten' is not a number"),
                          (("--len", "16", "--pid", "99999"), "has no process 99999")):
        full = ["--pid", str(hit["pid"]), "--addr", hit["vaddr"], *args]
        rc, _, err = stasis("dump-memory", m.id, *full, "-o", str(tmp_path / "x"), "--repo", url)
        assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def run_fx3(script: str) -> str:
    from stasis.testbed.images import rootfs_tar

    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        podman("import", "--quiet", rootfs_tar(with_workload=False), IMAGE)
    name = f"fx3-{secrets.token_hex(4)}"
    podman("run", "-d", "--network", "none", "--name", name, IMAGE, "sh", "-c", script)
    return name


def wait_comms(name: str, want: list[str]) -> dict[str, list[int]]:
    deadline = time.monotonic() + 30
    while True:
        top = podman("top", name, "pid", "comm", check=False).stdout
        comms: dict[str, list[int]] = {}
        for line in top.splitlines()[1:]:
            pid, comm = line.split()[:2]
            comms.setdefault(comm, []).append(int(pid))
        if sorted(c for c, pids in comms.items() for _ in pids) == sorted(want):
            return comms
        assert time.monotonic() < deadline, f"the container's processes never became {want}: {top}"
        time.sleep(0.2)


@pytest.mark.e2e
def test_diff_between_two_checkpoints_of_a_changing_container(real_stack, tmp_path, stasis):
    script = ("mkfifo /tmp/go; sleep 1000 & read x < /tmp/go; exec 4</etc/passwd; echo new > /tmp/fx3-new; "
              "httpd -f -p 127.0.0.1:8081 & sleep 2000 & wait")
    name = run_fx3(script)
    try:
        wait_comms(name, ["sh", "sleep"])
        podman("container", "checkpoint", name, "--leave-running", "--export", str(tmp_path / "a.tar"),
               "--compress", "none")
        podman("exec", name, "sh", "-c", "echo go > /tmp/go")
        comms = wait_comms(name, ["sh", "sleep", "sleep", "httpd"])
        podman("container", "checkpoint", name, "--leave-running", "--export", str(tmp_path / "b.tar"),
               "--compress", "none")
    finally:
        podman("rm", "-f", name, check=False)
    repo = Repository.init(f"file://{tmp_path}/repo", PASSWORD)
    a, b = store(repo, str(tmp_path / "a.tar"), name), store(repo, str(tmp_path / "b.tar"), name)
    rc, out, err = stasis("diff", a.id, b.id[:8], "--repo", repo.url, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["a"]["checkpoint"] == a.id and doc["b"]["checkpoint"] == b.id and doc["same_container"]
    assert not doc["identical"]
    sh, httpd = comms["sh"][0], comms["httpd"][0]
    added = {p["pid"]: (p["ppid"], p["comm"], p["argv"]) for p in doc["processes"]["added"]}
    sleep2000 = next(pid for pid, (_, _, argv) in added.items() if argv == ["sleep", "2000"])
    assert added == {httpd: (sh, "httpd", ["httpd", "-f", "-p", "127.0.0.1:8081"]),
                     sleep2000: (sh, "sleep", ["sleep", "2000"])}
    assert doc["processes"]["removed"] == [] and doc["processes"]["changed"] == []
    files = {f["pid"]: f for f in doc["files"]}
    assert list(files) == [sh]                          # the first sleep's files did not change
    assert {"fd": 4, "type": "REG", "path": "/etc/passwd"} in files[sh]["added"]
    assert doc["sockets"] == {"added": ["tcp stream LISTEN 127.0.0.1:8081 -> 0.0.0.0:0"], "removed": []}
    mem = {x["pid"]: x for x in doc["memory"]}
    assert set(mem) == {sh, comms["sleep"][0], comms["sleep"][1], httpd}
    assert mem[httpd]["pages_before"] is None and mem[httpd]["pages_after"] > 0
    assert mem[httpd]["delta"] == mem[httpd]["pages_after"]
    assert [f["path"] for f in doc["fs"]["added"]] == ["/tmp/fx3-new"] and doc["fs"]["added"][0]["size"] == 4
    assert doc["fs"]["removed"] == [] and doc["fs"]["deleted_added"] == []
    rc, out, _ = stasis("diff", a.id, b.id, "--repo", repo.url)
    assert rc == 0 and f"  + {httpd} (parent {sh}) httpd: httpd -f -p 127.0.0.1:8081" in out
    assert f"  + {sh} (sh) fd 4 REG /etc/passwd" in out and "  + /tmp/fx3-new (file, 4 bytes)" in out
    assert "  + tcp stream LISTEN 127.0.0.1:8081" in out
    rc, out, _ = stasis("diff", a.id, a.id, "--repo", repo.url, "--json")
    assert rc == 0 and json.loads(out)["identical"]


def restore_and_remove(archive: str) -> None:
    """`podman container restore --import` the archive under a fresh fx3- name; it must run; remove it."""
    name = f"fx3-{secrets.token_hex(4)}"
    try:
        r = podman("container", "restore", "--import", archive, "--name", name, check=False)
        assert r.returncode == 0, r.stderr
        state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
        assert state == "running"
        assert "sleep" in podman("top", name, "comm").stdout
    finally:
        podman("rm", "-f", name, check=False)


@pytest.mark.e2e
def test_export_is_a_podman_archive(stored, stasis, tmp_path):
    m, url = stored["manifest"], stored["repo"].url
    out = tmp_path / "ckpt.tar"
    rc, text, err = stasis("export", m.id, "-o", str(out), "--repo", url, "--json")
    assert rc == 0, err
    doc = json.loads(text)
    assert doc["size"] == stored["archive_size"] == os.path.getsize(out)
    assert out.read_bytes() == (stored["tmp"] / "ckpt.tar").read_bytes()
    rc, _, err = stasis("export", m.id, "-o", str(out), "--repo", url)
    assert rc == 1 and err == f"stasis: error: {out} exists: give --force to replace it\n"
    restore_and_remove(str(out))


MALICIOUS = {
    "dotdot": lambda: [(member("../fx3-escaped"), b"pwned")],
    "absolute": lambda: [(member("/tmp/fx3-absolute-escape"), b"pwned")],
    "symlink": lambda: [(member("checkpoint/core-1.img", tarfile.SYMTYPE, link="/etc/passwd"), b"")],
    "hardlink": lambda: [(member("rootfs-diff.tar", tarfile.LNKTYPE, link="/etc/shadow"), b"")],
    "device": lambda: [(member("checkpoint/x.img", tarfile.CHRTYPE), b"")],
    "deleted": lambda: [(member("deleted.files"), b'["/bin/ok", "../../etc/passwd"]')],
    "unknown": lambda: [(member("etc/cron.d/evil"), b"* * * * * root sh")],
}
MALICIOUS_ERRORS = {
    "dotdot": "has a member '../fx3-escaped' that climbs out with '..'",
    "absolute": "has an absolute member name '/tmp/fx3-absolute-escape'",
    "symlink": "has a link 'checkpoint/core-1.img' -> '/etc/passwd'",
    "hardlink": "has a link 'rootfs-diff.tar' -> '/etc/shadow'",
    "device": "has a device, fifo or special member 'checkpoint/x.img'",
    "deleted": "deleted.files names '../../etc/passwd', which escapes the container's root",
    "unknown": "has an unexpected member 'etc/cron.d/evil'",
}


def malicious_tar(path, extra: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    config = json.dumps({"id": "e" * 64, "name": "evil"}).encode()
    with tarfile.open(path, "w") as t:
        for info, data in [(member("config.dump"), config), (member("checkpoint/pstree.img"), b"x"), *extra]:
            if info.isfile():
                info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def repo_files(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                  if "locks" not in d)


@pytest.mark.parametrize("kind", sorted(MALICIOUS))
def test_import_refuses_malicious_archives_storing_nothing(kind, tmp_path, stasis):
    repo = Repository.init(f"file://{tmp_path}/repo", PASSWORD)
    before = repo_files(tmp_path / "repo")
    archive = malicious_tar(tmp_path / "evil.tar", MALICIOUS[kind]())
    rc, out, err = stasis("import", archive, "--repo", repo.url, "--workdir", str(tmp_path))
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("stasis: error: the checkpoint archive") and MALICIOUS_ERRORS[kind] in err, err
    assert repo.checkpoint_ids() == [] and repo_files(tmp_path / "repo") == before
    assert sorted(os.listdir(tmp_path)) == ["evil.tar", "repo"]      # the private stage is gone
    assert not os.path.exists("/tmp/fx3-absolute-escape") and not (tmp_path.parent / "fx3-escaped").exists()


def test_import_refuses_non_checkpoints(tmp_path, stasis):
    repo = Repository.init(f"file://{tmp_path}/repo", PASSWORD)
    with tarfile.open(tmp_path / "x.tar", "w") as t:
        t.addfile(member("config.dump", size=2), io.BytesIO(b"{}"))
    rc, _, err = stasis("import", str(tmp_path / "x.tar"), "--repo", repo.url)
    assert rc == 1 and err == "stasis: error: the checkpoint archive's config.dump names container id 'None', " \
                              "not a 64-hex id\n"
    rc, _, err = stasis("import", malicious_tar(tmp_path / "y.tar", []), "--repo", repo.url)
    assert rc == 1 and err.startswith("stasis: error: ") and err.count("\n") == 1   # pstree.img is not CRIU's
    rc, _, err = stasis("import", str(tmp_path / "missing.tar"), "--repo", repo.url)
    assert rc == 2 and err == f"stasis: error: {tmp_path}/missing.tar: no such file\n"
    rc, _, err = stasis("import", str(tmp_path / "x.tar"), "--host", "../evil", "--repo", repo.url)
    assert rc == 2 and "--host '../evil': a host name is" in err
    assert repo.checkpoint_ids() == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=30) | st.sampled_from(["..", "/etc/passwd", "a/../../b", "/", "./x", ""]),
                max_size=6))
def test_fuzz_deleted_files_never_escape(paths):
    from stasis.forensics.export_import import _deletions

    try:
        out = _deletions(json.dumps(paths).encode())
    except ArchiveError as e:
        assert "\n" not in str(e)
        return
    for p in out:
        assert p.startswith("/") and ".." not in p.split("/") and "\0" not in p


@pytest.mark.e2e
def test_import_podman_export_then_inspect_and_restore(stored, stasis, tmp_path):
    import zstandard

    url = stored["repo"].url
    plain = stored["tmp"] / "ckpt.tar"
    rc, out, err = stasis("import", str(plain), "--host", "host-b", "--repo", url, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["container"]["name"] == stored["name"] and doc["host"] == "host-b" and doc["processes"] == 2
    assert doc["new_bytes"] == 0 and not doc["decompressed"]       # the same archive: fully deduplicated
    rc, out, err = stasis("inspect", doc["checkpoint"], "--repo", url, "--ps", "--json")
    assert rc == 0, err
    s = json.loads(out)["summary"]
    assert s["checkpoint"] == doc["checkpoint"] and s["host"] == "host-b" and s["runtime"] == "podman"
    assert s["container"]["name"] == stored["name"] and s["container"]["image"] == IMAGE and s["processes"] == 2
    manifest = stored["repo"].read_manifest(doc["checkpoint"])
    assert manifest.image is None and manifest.container.image_id != "0" * 64
    assert manifest.criu_stats["pages_written"] > 0

    # podman's default compression is zstd: imported as the plain tar, then restorable from an export.
    zst = tmp_path / "ckpt.tar.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    rc, out, err = stasis("import", str(zst), "--repo", url, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["decompressed"] and doc["host"] == "imported"
    rc, _, err = stasis("export", doc["checkpoint"], "-o", str(tmp_path / "again.tar"), "--repo", url)
    assert rc == 0, err
    assert (tmp_path / "again.tar").read_bytes() == plain.read_bytes()
    restore_and_remove(str(tmp_path / "again.tar"))
    rc, out, _ = stasis("inspect", doc["checkpoint"], "--repo", url)
    assert rc == 0 and f"container    {stored['name']}" in out


# --- reading in place from S3 -----------------------------------------------------------------------

class CountingBackend:
    """The real backend, counting the bytes every load() returns."""

    def __init__(self, inner):
        self.inner, self.loaded = inner, 0

    def load(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.load(key, offset, length)
        self.loaded += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.e2e
def test_questions_fetch_only_what_they_read_from_s3(real_stack, seaweedfs, monkeypatch, tmp_path, stasis):
    """A 64 MiB memhold checkpoint in a real S3 repository (SeaweedFS): the views other than memory
    search fetch a few percent of it; grep reads the pages; every answer is still the truth."""
    from stasis.storage.backend import open_backend
    from stasis.testbed.images import WORKLOAD_IMAGE, rootfs_tar

    for k, v in seaweedfs.env.items():
        monkeypatch.setenv(k, v)
    if podman("image", "exists", WORKLOAD_IMAGE, check=False).returncode != 0:
        podman("import", "--quiet", rootfs_tar(with_workload=True), WORKLOAD_IMAGE)
    name, archive = f"fx4-{secrets.token_hex(4)}", str(tmp_path / "ckpt.tar")
    try:
        podman("run", "-d", "--network", "none", "--name", name, WORKLOAD_IMAGE, "/bin/memhold", "64", "0")
        deadline = time.monotonic() + 60
        while "counter=" not in podman("exec", name, "cat", "/tmp/status", check=False).stdout:
            assert time.monotonic() < deadline, "memhold never reported its status"
            time.sleep(0.2)
        podman("exec", name, "sh", "-c", "echo fx4-data > /tmp/fx4-file")
        podman("container", "checkpoint", name, "--export", archive, "--compress", "none")
    finally:
        podman("rm", "-f", name, check=False)
    url = f"s3://stasis-fx4-{secrets.token_hex(4)}/repo"
    manifest = store(Repository.init(url, PASSWORD), archive, name)
    size = manifest.checkpoint.size
    assert size > 64 << 20

    counting = CountingBackend(open_backend(url))
    repo = Repository.open(url, PASSWORD, backend=counting)
    after_open = counting.loaded                     # config, keys and index files: not the checkpoint
    with Checkpoint.open(repo, manifest.id) as ckpt:
        procs = ckpt.processes(cmdline=True, env=True)
        assert [p["argv"] for p in procs] == [["/bin/memhold", "64", "0"]]
        for view in (ckpt.summary, ckpt.files, ckpt.sockets, ckpt.mounts, ckpt.maps, ckpt.stats):
            view()
        assert any(f["path"] == "/tmp/fx4-file" for f in ckpt.fs()["changed"])
        out = io.BytesIO()
        assert ckpt.dump_file("/tmp/fx4-file", out)["size"] == 9 and out.getvalue() == b"fx4-data\n"
        views = counting.loaded - after_open      # the manifest (its chunk list), then what the views read
        assert 0 < ckpt.fetched_bytes < views < size // 20, (ckpt.fetched_bytes, views, size)
        # Memory search reads every page, each chunk once.
        assert ckpt.grep("fx4-not-in-memory-at-all")["hits"] == []
        assert size // 2 < counting.loaded - after_open < size * 2

    # The CLI answers the same from S3.
    rc, out, err = stasis("inspect", manifest.id, "--repo", url, "--ps", "--cmdline", "--json")
    assert rc == 0, err
    assert json.loads(out)["processes"][0]["argv"] == ["/bin/memhold", "64", "0"]
