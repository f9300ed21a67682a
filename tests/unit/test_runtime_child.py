"""Pure helpers of the container children: program lookup (as runc's, at create), seccomp codes,
mount attributes, and the spawner protocol's encoding."""

from __future__ import annotations

import errno

import pytest

from agent import linux
from agent.runtime import protocol, seccomp
from agent.runtime.child import rootfs
from agent.runtime.child.common import SetupError
from agent.runtime.child.process import _look_path


def test_look_path(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "sbin").mkdir()
    prog = tmp_path / "sbin" / "prog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    data = tmp_path / "bin" / "data"
    data.write_text("x")
    data.chmod(0o644)
    (tmp_path / "bin" / "prog").mkdir()  # a directory of that name does not count
    env = {"PATH": f"{tmp_path / 'bin'}:{tmp_path / 'sbin'}"}
    assert _look_path("prog", env) == str(prog)
    assert _look_path(str(prog), {}) == str(prog)
    with pytest.raises(SetupError, match=r"exec nope: no such file or directory in \$PATH"):
        _look_path("nope", env)
    with pytest.raises(SetupError, match="exec data: permission denied"):
        _look_path("data", {"PATH": str(tmp_path / "bin")})
    with pytest.raises(SetupError, match="no such file or directory"):
        _look_path(str(tmp_path / "missing"), env)


def test_action_codes():
    assert seccomp.action_code("SCMP_ACT_ALLOW", 5) == 0x7FFF0000  # no data for ALLOW
    assert seccomp.action_code("SCMP_ACT_ERRNO", 0) == 0x00050000 | errno.EPERM
    assert seccomp.action_code("SCMP_ACT_ERRNO", errno.ENOSYS) == 0x00050000 | errno.ENOSYS
    assert seccomp.action_code("SCMP_ACT_TRACE", 7) == 0x7FF00007
    assert seccomp.action_code("SCMP_ACT_KILL_PROCESS", 0) == 0x80000000


def test_mount_attrs_leave_a_bind_as_a_remount_with_the_flags_would():
    ro = (linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RELATIME)
    attr_set, attr_clr = rootfs.mount_attrs(ro)
    assert attr_set == (linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV
                        | linux.MOUNT_ATTR_NOEXEC)  # relatime is 0
    assert attr_clr == linux.MOUNT_ATTR_NODIRATIME | linux.MOUNT_ATTR__ATIME
    attr_set, attr_clr = rootfs.mount_attrs(linux.MS_NOSUID | linux.MS_NOATIME)
    assert attr_set == linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NOATIME
    assert attr_clr & linux.MOUNT_ATTR_RDONLY and attr_clr & linux.MOUNT_ATTR_NOEXEC
    assert not attr_clr & linux.MOUNT_ATTR_NOSUID


def test_protocol_steps_and_requests_round_trip():
    steps = [protocol.Pid(42), protocol.Cgroup("/sys/fs/cgroup/a", []), protocol.Cgroup("", ["/v1/cpu/a"]),
             protocol.Ready(), protocol.Start(), protocol.Failed("mount /proc: EPERM"),
             protocol.Reply({"init_pid": 7})]
    for step in steps:
        assert protocol.decode(protocol.encode(step)) == step
        assert type(protocol.decode(protocol.encode(step))) is type(step)
    # NamedTuples compare as tuples (Ready() == Start() == ()): steps are told apart by type
    assert not isinstance(protocol.decode(protocol.encode(protocol.Ready())), protocol.Start)
    exec_req = protocol.ExecRequest(9, {"args": ["sh"]}, protocol.Cgroup("/cg", ["/v1"]), None)
    assert protocol.decode_request(protocol.encode_request(exec_req)) == exec_req
    create = protocol.CreateRequest({"id": "c"}, None)
    assert protocol.decode_request(protocol.encode_request(create)) == create
    task = protocol.TaskRequest("sandbox-pidns-init", {})
    assert protocol.decode_request(protocol.encode_request(task)) == task
    with pytest.raises(ValueError, match="unknown spawner request"):
        protocol.decode_request(b'{"op": "nope"}')
