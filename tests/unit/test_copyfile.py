"""CopyFile below a root in tmp_path (no root needed: uid/gid -1 leave ownership alone)."""

from __future__ import annotations

import os
import stat

import pytest

from agent.copyfile import SHARED, copy_file
from agent.errors import FailedPrecondition, InvalidArgument
from agent.protocols import agent_pb2


def req(path, data=b"", *, size=None, offset=0, mode=0o644, dir_mode=0o750):
    return agent_pb2.CopyFileRequest(path=f"{SHARED}/{path}", data=data, offset=offset,
                                     file_size=len(data) if size is None else size,
                                     file_mode=mode, dir_mode=dir_mode, uid=-1, gid=-1)


def test_chunks_land_in_a_temp_file_then_rename(tmp_path):
    copy_file(str(tmp_path), req("c1/etc/hosts", b"hello ", size=11))
    assert not (tmp_path / "c1/etc/hosts").exists()
    assert (tmp_path / "c1/etc/.hosts.kata-copy").read_bytes() == b"hello "
    assert stat.S_IMODE(os.stat(tmp_path / "c1/etc").st_mode) == 0o750
    copy_file(str(tmp_path), req("c1/etc/hosts", b"world", size=11, offset=6, mode=0o600))
    assert (tmp_path / "c1/etc/hosts").read_bytes() == b"hello world"
    assert stat.S_IMODE(os.stat(tmp_path / "c1/etc/hosts").st_mode) == 0o600
    assert os.listdir(tmp_path / "c1/etc") == ["hosts"]


def test_out_of_order_chunk_refused_and_aborts(tmp_path):
    copy_file(str(tmp_path), req("f", b"ab", size=6))
    with pytest.raises(FailedPrecondition, match="offset"):
        copy_file(str(tmp_path), req("f", b"ef", size=6, offset=4))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path", ["../../etc/passwd", "a/../../x", "/etc/passwd"])
def test_dotdot_and_outside_refused(tmp_path, path):
    r = req(path, b"x")
    if path.startswith("/"):
        r.path = path
    with pytest.raises(InvalidArgument, match="^path"):
        copy_file(str(tmp_path), r)
    assert os.listdir(tmp_path) == []


def test_symlinked_parent_refused(tmp_path):
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir()
    (tmp_path / "evil").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="symlink"):
        copy_file(str(tmp_path), req("evil/x", b"x"))
    assert os.listdir(outside) == []


@pytest.mark.parametrize("target, ok", [("/etc/passwd", False), ("../../x", False), ("../sib", True),
                                        ("b/c", True)])
def test_symlink_entries(tmp_path, target, ok):
    r = req("c/link", target.encode(), mode=stat.S_IFLNK | 0o777)
    if ok:
        copy_file(str(tmp_path), r)
        assert os.readlink(tmp_path / "c/link") == target
    else:
        with pytest.raises(InvalidArgument, match="^data"):
            copy_file(str(tmp_path), r)
        assert os.listdir(tmp_path) == []  # the parent it would have created is gone again


def test_directory_entry(tmp_path):
    copy_file(str(tmp_path), req("c/d", mode=stat.S_IFDIR | 0o711))
    assert stat.S_IMODE(os.stat(tmp_path / "c/d").st_mode) == 0o711
    with pytest.raises(InvalidArgument):
        copy_file(str(tmp_path), req("c/d", b"x"))  # a file does not replace a directory
