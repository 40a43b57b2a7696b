"""volume_hold: a mounted volume stays readable through a bind after its own unmount (as podman's
clean-up does to a tmpfs volume); a plain folder is left as it is. Real mounts: CI runs as root."""

import errno
import os
import subprocess

import pytest

from stasis.agent import volume_hold
from stasis.errors import RuntimeFailure


@pytest.fixture
def tmpfs_volume(tmp_path):
    data = tmp_path / "vol" / "_data"
    data.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nodev,nosuid", "tmpfs", str(data)], check=True)
    (data / "file").write_bytes(b"x" * 100_000)
    yield str(data)
    if os.path.ismount(data):
        subprocess.run(["umount", str(data)], check=True)


def test_a_tmpfs_volume_survives_its_unmount_while_held(tmp_path, tmpfs_volume):
    plain = tmp_path / "plain"
    plain.mkdir()
    holds = tmp_path / "scratch" / "volumes"
    with volume_hold.held({"t": tmpfs_volume, "p": str(plain)}, str(holds)) as paths:
        assert paths["p"] == str(plain)               # nothing to hold
        assert paths["t"] == str(holds / "t") and os.path.ismount(paths["t"])
        subprocess.run(["umount", tmpfs_volume], check=True)   # what podman's clean-up does
        assert os.listdir(tmpfs_volume) == []
        with open(os.path.join(paths["t"], "file"), "rb") as f:
            assert f.read() == b"x" * 100_000
        with pytest.raises(OSError) as refused:       # read-only: a delete of the scratch folder
            os.unlink(os.path.join(paths["t"], "file"))   # cannot reach the volume
        assert refused.value.errno == errno.EROFS
        flags = os.statvfs(paths["t"]).f_flag          # and the source's locked flags are kept
        assert flags & os.ST_RDONLY and flags & os.ST_NODEV and flags & os.ST_NOSUID
    assert not os.path.ismount(holds / "t")


def test_a_bind_volume_on_the_same_filesystem_is_held_too(tmp_path):
    """podman's `--opt type=none --opt o=bind` volume: same device as its parent, still a mount."""
    source, data = tmp_path / "elsewhere", tmp_path / "vol" / "_data"
    source.mkdir()
    data.mkdir(parents=True)
    (source / "file").write_text("kept")
    subprocess.run(["mount", "--bind", str(source), str(data)], check=True)
    try:
        assert not os.path.ismount(data) and str(data) in volume_hold.mount_points()   # only mountinfo knows
        with volume_hold.held({"b": str(data)}, str(tmp_path / "scratch")) as paths:
            assert paths["b"] != str(data)
            subprocess.run(["umount", str(data)], check=True)
            assert (tmp_path / "scratch" / "b" / "file").read_text() == "kept"
    finally:
        if str(data) in volume_hold.mount_points():
            subprocess.run(["umount", str(data)], check=True)


def test_holds_a_killed_agent_left_are_released_by_the_next(tmp_path, tmpfs_volume):
    stage = tmp_path / "stage"
    held = volume_hold.held({"t": tmpfs_volume}, str(stage / "restore-x" / "volumes"))
    paths = held.__enter__()   # never exited: the agent was killed
    assert paths["t"] in volume_hold.mount_points()
    assert volume_hold.release_under(str(stage)) == [paths["t"]]
    assert paths["t"] not in volume_hold.mount_points()
    assert volume_hold.release_under(str(stage)) == []


def test_a_bind_that_cannot_be_made_fails_before_the_dump(tmp_path, tmpfs_volume):
    blocker = tmp_path / "scratch"
    blocker.write_text("not a folder")
    with pytest.raises(RuntimeFailure, match="could not hold volume t open"):
        with volume_hold.held({"t": tmpfs_volume}, str(blocker / "volumes")):
            pass
