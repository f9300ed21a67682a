"""secure_join keeps paths inside the root; resolve_user reads the container's passwd/group."""

from __future__ import annotations

import pytest

from agent.runtime.child.common import SetupError
from agent.runtime.child.process import resolve_user
from agent.runtime.paths import secure_join


def test_dotdot_and_absolute_symlinks_stay_inside(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "up").symlink_to("../../../..")
    (root / "abs").symlink_to("/etc")
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert secure_join(r, "/../../x") == f"{r}/x"
    assert secure_join(r, "/up/x") == f"{r}/x"
    assert secure_join(r, "/abs/passwd") == f"{r}/etc/passwd"
    assert secure_join(r, "missing/a/../b") == f"{r}/missing/b"
    with pytest.raises(OSError):
        secure_join(r, "/loop/x")


def _proc(**kw):
    return {"uid": 0, "gid": 0, "additional_gids": [], "user": "", **kw}


def test_resolve_user(tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (tmp_path / "group").write_text("root:x:0:\nusers:x:100:user\nextra:x:2000:other,user\n")
    u = resolve_user(_proc(user="user"), str(tmp_path))
    assert (u.uid, u.gid, sorted(u.groups), u.home) == (1000, 1000, [100, 2000], "/home/user")
    u = resolve_user(_proc(user="user:extra"), str(tmp_path))
    assert (u.uid, u.gid, u.groups) == (1000, 2000, [])
    u = resolve_user(_proc(uid=4242, gid=7, additional_gids=[9]), str(tmp_path))
    assert (u.uid, u.gid, u.groups, u.home) == (4242, 7, [9], "/")
    assert resolve_user(_proc(uid=1000), str(tmp_path)).home == "/home/user"
    with pytest.raises(SetupError, match="nosuch"):
        resolve_user(_proc(user="nosuch"), str(tmp_path))
