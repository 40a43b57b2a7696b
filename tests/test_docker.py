"""Pure parts of the docker driver: configuration translation and archive validation (the driver
itself runs against real dockerd in test_docker_e2e)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from stasis.agent.docker import COMMIT_REPO, _extract_archive, translate
from stasis.errors import IntegrityError

INSPECT = {
    "Id": "c" * 64, "Name": "/web",
    "Config": {"Cmd": ["/bin/memhold", "64"], "Entrypoint": None, "Env": ["A=1", "PATH=/bin"],
               "WorkingDir": "/data", "User": "1000:1000", "Labels": {"app": "db"}, "Hostname": "web",
               "Tty": False, "OpenStdin": False, "StopSignal": "SIGTERM", "Volumes": {"/vol": {}}},
    "HostConfig": {"NetworkMode": "none", "Binds": ["/srv:/srv:ro"], "Memory": 268435456, "MemorySwap": -1,
                   "CpuShares": 512, "PidsLimit": 100, "Privileged": False, "CapAdd": ["NET_ADMIN"],
                   "CapDrop": None, "ReadonlyRootfs": True, "Tmpfs": {"/run": ""}, "ShmSize": 67108864,
                   "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 2048}],
                   "RestartPolicy": {"Name": "", "MaximumRetryCount": 0}},
}


def test_translation_keeps_what_the_container_was_created_with():
    create, host = translate(INSPECT)
    assert create["command"] == ["/bin/memhold", "64"] and create["environment"] == ["A=1", "PATH=/bin"]
    assert (create["working_dir"], create["user"], create["labels"]) == ("/data", "1000:1000", {"app": "db"})
    assert create["volumes"] == ["/vol"] and create["stop_signal"] == "SIGTERM"
    assert "entrypoint" not in create   # unset stays unset: the image's own applies
    assert host["network_mode"] == "none" and host["binds"] == ["/srv:/srv:ro"]
    assert host["mem_limit"] == 268435456 and host["pids_limit"] == 100 and host["read_only"] is True
    assert host["cap_add"] == ["NET_ADMIN"] and "cap_drop" not in host and "restart_policy" not in host
    assert host["ulimits"][0]["Name"] == "nofile" and host["ulimits"][0]["Hard"] == 2048


def test_translation_of_a_minimal_container_defaults_to_no_network():
    create, host = translate({"Config": {"Cmd": ["sh"]}, "HostConfig": {}})
    assert create["command"] == ["sh"] and host == {"network_mode": "none", "privileged": False,
                                                    "read_only": False}


def archive(tmp_path, members: list[tuple[str, bytes | None, str]], config: dict | None = None) -> str:
    path = tmp_path / "a.tar"
    cfg = config if config is not None else {"inspect": INSPECT, "checkpoint": "stasis-0123abcd",
                                             "committed_image": f"{COMMIT_REPO}:abc"}
    with tarfile.open(path, "w") as tar:
        for name, data, kind in [("config.json", json.dumps(cfg).encode(), "file"), ("image.tar", b"x", "file"),
                                 ("checkpoint", None, "dir"), *members]:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_well_formed_archive_extracts(tmp_path):
    cfg = _extract_archive(archive(tmp_path, [("checkpoint/pages-1.img", b"p" * 10, "file")]), str(tmp_path / "x"))
    assert cfg["checkpoint"] == "stasis-0123abcd"
    assert (tmp_path / "x" / "checkpoint" / "pages-1.img").read_bytes() == b"p" * 10


@pytest.mark.parametrize("member", [
    ("../escape", b"x", "file"), ("/etc/cron.d/x", b"x", "file"), ("checkpoint/../../x", b"x", "file"),
    ("checkpoint/link", b"/etc/shadow", "symlink"), ("other.txt", b"x", "file"),
])
def test_hostile_members_are_refused_before_extraction(tmp_path, member):
    with pytest.raises(IntegrityError, match="not allowed"):
        _extract_archive(archive(tmp_path, [member]), str(tmp_path / "x"))
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("config", [
    {"inspect": INSPECT, "checkpoint": "../../etc", "committed_image": f"{COMMIT_REPO}:a"},
    {"inspect": INSPECT, "checkpoint": "stasis-1", "committed_image": "docker.io/evil:latest"},
    {"checkpoint": "stasis-1"},
])
def test_config_must_name_our_own_checkpoint_and_image(tmp_path, config):
    with pytest.raises(IntegrityError, match="config.json"):
        _extract_archive(archive(tmp_path, [], config), str(tmp_path / "x"))


async def test_a_start_refused_for_content_already_present_is_tried_again_and_other_errors_are_not(monkeypatch):
    """containerd's 'content ... already exists' after a fresh dump goes once its garbage collector
    ran (moby issue 42900): the start is tried again, with a short backoff; any other error is final."""
    from stasis.agent import docker as driver
    from stasis.errors import RuntimeFailure

    runtime = driver.DockerRuntime()
    outcomes = [RuntimeFailure("docker: failed to upload checkpoint to containerd: commit failed: content "
                               "sha256:0751: already exists")] * 2 + [None]

    def start(cid, ckpt):
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome
    monkeypatch.setattr(runtime, "_post_start", start)
    await runtime._start_from_checkpoint("c" * 64, "stasis-1", "web")
    assert outcomes == []
    outcomes[:] = [RuntimeFailure("docker: criu failed"), None]
    with pytest.raises(RuntimeFailure, match="criu failed"):
        await runtime._start_from_checkpoint("c" * 64, "stasis-1", "web")
    assert outcomes == [None]
