"""`stasis inspect` and `stasis grep`: archive member validation, hostile archives, and a real checkpoint
read back from a repository."""

from __future__ import annotations

import argparse
import codecs
import importlib.util
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

from tests.conftest import CI

if importlib.util.find_spec("stasis.forensics.criu_pb") is None:
    missing = "CRIU image decoders are not generated: run 'bash scripts/criu-images.sh' (or 'make provision')"
    if CI:
        pytest.fail(missing, pytrace=False)
    pytest.skip(missing, allow_module_level=True)

from stasis.controller import cli, forensics_cli  # noqa: E402
from stasis.forensics import checkpoint as fx  # noqa: E402
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


def store(repo: Repository, archive: str, name: str = "web") -> Manifest:
    """What the agent's _checkpoint does after the dump: store the archive, commit a manifest."""
    m = Manifest(id=new_checkpoint_id(), created=now_rfc3339(), host="host-a", runtime="podman",
                 runtime_version="5", criu_version="4.1.1", container=ContainerRef("c" * 64, name, "img", "d" * 64),
                 leave_running=True, checkpoint=repo.store_file(archive), image=None, timings={}, criu_stats={})
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
    work = tmp_path / "work"
    work.mkdir()
    archive = hostile_tar(tmp_path / "evil.tar", HOSTILE[kind]())
    before = set(os.listdir(tmp_path))
    with pytest.raises(ArchiveError, match="^the checkpoint archive has") as err:
        Checkpoint.from_archive(archive, workdir=str(work))
    assert "\n" not in str(err.value)
    assert os.listdir(work) == []                    # the private folder is gone, with what it held
    assert set(os.listdir(tmp_path)) == before
    assert not os.path.exists("/tmp/fx2-absolute-escape") and not os.path.exists(tmp_path / "fx2-escaped")


def test_garbage_and_non_checkpoints_are_refused(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(ArchiveError, match="^the checkpoint archive is not a readable tar file"):
        Checkpoint.from_archive(str(junk), workdir=str(tmp_path))
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(ArchiveError, match="no checkpoint/pstree.img"):
        Checkpoint.from_archive(str(tmp_path / "empty.tar"), workdir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["empty.tar", "junk.tar"]


def test_cli_errors_are_one_line(tmp_path, stasis):
    repo = Repository.init(f"file://{tmp_path}/repo", PASSWORD)
    bad = store(repo, hostile_tar(tmp_path / "evil.tar", HOSTILE["dotdot"]()))
    rc, out, err = stasis("inspect", bad.id, "--repo", repo.url, "--workdir", str(tmp_path))
    assert rc == 1 and out == "" and err.startswith("stasis: error: the checkpoint archive has a member '../fx2")
    assert err.count("\n") == 1 and not (tmp_path.parent / "fx2-escaped").exists()
    rc, _, err = stasis("grep", "0123456789abcdef", "x", "--repo", repo.url)
    assert rc == 1 and err == f"stasis: error: no checkpoint '0123456789abcdef' in {repo.url}\n"
    rc, _, err = stasis("inspect", "zz", "--repo", repo.url)
    assert rc == 2 and "malformed" in err and err.count("\n") == 1
    rc, _, err = stasis("inspect", bad.id, "--repo", repo.url, "--workdir", str(tmp_path / "nowhere"))
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
    environment and one only in sh's heap, that created /tmp/fx2-marker and deleted /bin/arch; stored
    in a fresh encrypted file repository as the agent stores one."""
    tmp = tmp_path_factory.mktemp("fx2")
    env_secret, heap_secret = f"envsecret-{secrets.token_hex(8)}", f"heapsecret-{secrets.token_hex(8)}"
    script = (f"echo fx2-marker-data > /tmp/fx2-marker; rm /bin/arch; exec 3</etc/passwd; "
              f"S=$(echo {codecs.encode(heap_secret, 'rot13')} | tr a-z n-za-m); sleep 1000 & wait")
    archive = str(tmp / "ckpt.tar")
    name, procs = checkpoint_container(script, {"FX_SECRET": env_secret}, archive)
    repo = Repository.init(f"file://{tmp}/repo", PASSWORD)
    manifest = store(repo, archive, name)
    return {"repo": repo, "manifest": manifest, "procs": procs, "env": env_secret, "heap": heap_secret,
            "script": script, "name": name, "tmp": tmp, "archive_size": os.path.getsize(archive)}


@pytest.mark.e2e
def test_inspect_shows_exactly_the_truth(stored, stasis):
    m, procs = stored["manifest"], stored["procs"]
    work = stored["tmp"] / "work"
    work.mkdir(exist_ok=True)
    rc, out, err = stasis("inspect", m.id[:8], "--repo", stored["repo"].url, "--all", "--json",
                          "--workdir", str(work))
    assert rc == 0, err
    doc = json.loads(out)
    assert os.listdir(work) == []                    # unpacked privately, removed afterwards

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

    assert any(x["mountpoint"] == "/" and x["fstype"] == "overlayfs" for x in doc["mounts"])
    assert any(x["mountpoint"] == "/proc" for x in doc["mounts"])
    for p in doc["maps"]:
        assert any(v["mapping"] == "/bin/busybox" and v["perms"] == "r-xp" for v in p["maps"])
        assert any(v["mapping"] == "[stack]" for v in p["maps"])
    assert doc["stats"]["frozen_time"] > 0

    changed = {f["path"]: f for f in doc["fs"]["changed"]}
    assert changed["/tmp/fx2-marker"]["size"] == len("fx2-marker-data\n")
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

    with Checkpoint.from_archive(str(stored["tmp"] / "ckpt.tar"), workdir=str(tmp_path)) as ckpt:
        all_views(ckpt)
        names = sorted(os.listdir(ckpt.folder)) + ["../stats-dump", "../deleted.files", "../rootfs-diff.tar"]
        for name in names:
            path = os.path.join(ckpt.folder, name)
            if not os.path.exists(path):
                continue
            original = open(path, "rb").read()
            for damaged in (original[:len(original) // 2], original[:8] + bytes(b ^ 0x5a for b in original[8:40])
                            + original[40:], b"[1, {}]" if name.endswith(".files") else b""):
                with open(path, "wb") as f:
                    f.write(damaged)
                ckpt._cache.clear()
                try:
                    all_views(ckpt)
                except StasisError as e:
                    assert "\n" not in str(e)
            with open(path, "wb") as f:
                f.write(original)
