"""Linux.Seccomp through libseccomp: rules with errno, argument comparisons, exec'd processes."""

from __future__ import annotations

import grpc
import pytest

from agent.runtime import seccomp
from tests.integration.test_containers import create, make_spec, read_all, run

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not seccomp.available(), reason="libseccomp.so.2 is not installed")]

SCRIPT = """
mkdir /tmp/a && echo mkdir-ok || echo mkdir-failed
touch /tmp/b && echo touch-ok
mkdir -m 755 /tmp/c 2>/dev/null && echo mode755-ok
grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status
"""


def _profile(**extra):
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}], **extra}


@pytest.mark.parametrize("nnp", [False, True])
def test_profile_makes_mkdir_fail_with_eperm(agent, busybox_rootfs, container_id, nnp):
    cfg = make_spec(busybox_rootfs, ["sh", "-c", SCRIPT])
    cfg["process"]["noNewPrivileges"] = nnp
    cfg["linux"]["seccomp"] = _profile()
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    lines = out.split("\n")
    assert "mkdir-failed" in lines and "touch-ok" in lines and "mode755-ok" not in lines
    assert "Operation not permitted" in err
    assert "Seccomp:\t2" in lines  # filter mode
    assert f"NoNewPrivs:\t{int(nnp)}" in lines


def test_argument_comparison_and_exec_inherits_the_filter(agent, busybox_rootfs, container_id):
    cfg = make_spec(busybox_rootfs, ["sleep", "1000"])
    # only kill(pid, 0) is refused (EACCES): arg 1 compared
    cfg["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
         "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]}]}
    create(agent, container_id, cfg)
    agent.client.call("StartContainer", {"container_id": container_id})
    try:
        proc = {"Args": ["sh", "-c", "kill -CONT $$ && echo cont-ok; kill -0 $$ || echo zero-denied"],
                "Env": ["PATH=/bin"], "Cwd": "/"}
        agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e1", "process": proc})
        assert agent.client.call("WaitProcess", {"container_id": container_id, "exec_id": "e1"}).status == 0
        out = read_all(agent, container_id, exec_id="e1").decode().split()
        err = read_all(agent, container_id, "ReadStderr", exec_id="e1").decode()
        assert out == ["cont-ok", "zero-denied"]
        assert "Permission denied" in err
    finally:
        agent.client.call("RemoveContainer", {"container_id": container_id})


def test_kill_process_action(agent, busybox_rootfs, container_id):
    cfg = make_spec(busybox_rootfs, ["sh", "-c", "echo before; exec mkdir /tmp/z"])
    cfg["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}]}
    status, out, _ = run(agent, container_id, cfg)
    assert status == 128 + 31  # SIGSYS
    assert out == "before\n"


def test_bad_profile_is_refused_naming_the_field(agent, busybox_rootfs, container_id):
    cfg = make_spec(busybox_rootfs, ["true"])
    cfg["linux"]["seccomp"] = _profile(defaultAction="SCMP_ACT_SOMETIMES")
    with pytest.raises(grpc.RpcError) as err:
        create(agent, container_id, cfg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "OCI.Linux.Seccomp.DefaultAction" in err.value.details()
