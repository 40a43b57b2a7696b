"""The command line: argument handling, JSON documents and one-line errors."""

from __future__ import annotations

import subprocess

import pytest

from stasis.controller.cli import build_parser, main, split_target, to_dict
from stasis.errors import InvalidArgument
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.testbed.cluster import stasis_argv
from stasis.testbed.ports import free_port


def test_global_options_work_before_and_after_the_command():
    p = build_parser()
    a = p.parse_args(["--json", "--controller", "127.0.0.1:9", "hosts"])
    b = p.parse_args(["hosts", "--json", "--controller", "127.0.0.1:9"])
    c = p.parse_args(["hosts"])
    assert (a.json, a.controller) == (b.json, b.controller) == (True, "127.0.0.1:9")
    assert c.json is False


def test_controller_from_environment(monkeypatch):
    monkeypatch.setenv("STASIS_CONTROLLER", "127.0.0.1:7777")
    assert build_parser().parse_args(["ps"]).controller == "127.0.0.1:7777"


@pytest.mark.parametrize("target", ["web", "/web", "host-a/", ""])
def test_bad_targets_are_refused(target):
    with pytest.raises(InvalidArgument, match="HOST/CONTAINER"):
        split_target(target)


def test_sizes_are_json_numbers():
    doc = to_dict(pb.ListCheckpointsResponse(checkpoints=[pb.CheckpointSummary(size_bytes=5, image_bytes=7)]))
    assert doc["checkpoints"][0]["size_bytes"] == 5 and doc["checkpoints"][0]["image_bytes"] == 7
    host = to_dict(pb.Host(info=pb.HostInfo(work_free_bytes=9, criu_features={"uffd": True})))
    assert host["info"]["work_free_bytes"] == 9 and host["info"]["criu_features"] == {"uffd": True}


def test_unreachable_controller_is_one_line_and_exit_1(capsys):
    assert main(["--controller", f"127.0.0.1:{free_port()}", "--insecure", "hosts"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "controller at 127.0.0.1:" in err[0] and "is unreachable" in err[0]


def test_usage_error_exits_2(capsys):
    assert main(["--controller", "127.0.0.1:1", "checkpoint", "noslash"]) == 2
    assert "HOST/CONTAINER" in capsys.readouterr().err


def test_installed_console_script_has_help():
    out = subprocess.run([*stasis_argv(), "migrate", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--to HOST" in out and "destination host" in out


def test_agent_refuses_unknown_runtime_clearly():
    result = subprocess.run([*stasis_argv(), "agent", "serve", "--host-name", "x", "--runtime", "lxc"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_port_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run([*stasis_argv(), "controller", "serve", "--listen", f"127.0.0.1:{port}",
                                 "--state", str(tmp_path / "c.db"), "--repo", f"file://{tmp_path}/repo",
                                 "--no-encryption", "--insecure"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_repo_listing_skips_a_damaged_manifest(tmp_path, capsys):
    from stasis.storage.repository import Repository

    repo = Repository.init(f"file://{tmp_path}/r", None, encrypt=False)
    repo.backend.save("checkpoints/0123456789abcdef.json", b"{not json")
    assert main(["repo", "checkpoints", repo.url, "--json"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "[]"
    assert "skipping checkpoint 0123456789abcdef" in out.err


def test_mistyped_local_repository_is_not_created(tmp_path, capsys):
    assert main(["repo", "checkpoints", f"file://{tmp_path}/typo"]) == 1
    assert "no stasis repository" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_repo_commands_without_a_controller(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setattr("stasis.storage.keys.SCRYPT_N", 1 << 10)
    monkeypatch.delenv("STASIS_PASSWORD", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    url = f"file://{tmp_path}/repo"
    assert main(["repo", "init", url, "--password-file", str(pw)]) == 0
    assert "encrypted" in capsys.readouterr().out
    # Without a password, one clear line.
    assert main(["repo", "info", url]) == 1
    assert "is encrypted: set STASIS_PASSWORD" in capsys.readouterr().err
    monkeypatch.setenv("STASIS_PASSWORD", "correct horse")
    assert main(["repo", "info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encrypted"] is True and info["chunker"]["algorithm"] == "tar-pages"
    assert main(["repo", "check", url]) == 0
    assert "no problems" in capsys.readouterr().out
    assert main(["repo", "prune", url, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dry_run"] is True
    monkeypatch.setenv("STASIS_NEW_PASSWORD", "second")
    assert main(["repo", "key", "add", url]) == 0
    capsys.readouterr()
    assert main(["repo", "key", "list", url, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    monkeypatch.setenv("STASIS_PASSWORD", "wrong")
    assert main(["repo", "info", url]) == 1
    assert "wrong password" in capsys.readouterr().err


def test_unencrypted_repository_says_so(tmp_path, capsys):
    url = f"file://{tmp_path}/plain"
    assert main(["repo", "init", url, "--no-encryption"]) == 0
    assert "NOT encrypted" in capsys.readouterr().out
    assert main(["repo", "info", url]) == 0
    assert "NONE" in capsys.readouterr().out


def test_repository_from_environment(tmp_path, capsys, monkeypatch):
    url = f"file://{tmp_path}/env-repo"
    monkeypatch.setenv("STASIS_REPOSITORY", url)
    assert main(["repo", "init", "--no-encryption"]) == 0
    assert main(["repo", "info", "--json"]) == 0
    assert url.split("://")[1] in capsys.readouterr().out
    assert main(["repo", "forget", "0123456789abcdef"]) == 1     # parsed as an id, not a URL
    assert "no checkpoint" in capsys.readouterr().err
    monkeypatch.delenv("STASIS_REPOSITORY")
    assert main(["repo", "info"]) == 2
    assert "set STASIS_REPOSITORY" in capsys.readouterr().err
