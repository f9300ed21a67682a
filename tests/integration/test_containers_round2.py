"""Runtime round 2: device cgroup rules for Linux.Devices, a retryable RemoveContainer, signal
state at exec, killing a frozen container."""

from __future__ import annotations

import os
import pathlib

import grpc
import pytest

from tests.integration.test_containers import create, make_spec, run

pytestmark = pytest.mark.timeout(120)

DEVICES_V1 = pathlib.Path("/sys/fs/cgroup/devices")
MEMORY_V1 = pathlib.Path("/sys/fs/cgroup/memory")


def _cgroup_dir(root: pathlib.Path, cid: str) -> pathlib.Path:
    found = [p for p in root.glob(f"**/{cid}") if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or not DEVICES_V1.is_dir(),
                    reason="needs /dev/fuse and the v1 devices controller")
def test_listed_device_is_allowed_by_the_device_cgroup(agent, busybox_rootfs, container_id):
    st = os.stat("/dev/fuse")
    cfg = make_spec(busybox_rootfs, ["sh", "-c", "cat /sys/fs/cgroup/devices/devices.list; "
                                     "exec 3<>/dev/fuse && echo opened; (: </dev/kmsg) 2>/dev/null || echo kmsg-denied"])
    assert cfg["linux"]["resources"]["devices"][0]["allow"] is False  # deny-all first
    cfg["linux"]["devices"] = [{"path": "/dev/fuse", "type": "c", "major": os.major(st.st_rdev),
                                "minor": os.minor(st.st_rdev), "fileMode": 0o666}]
    # /dev/kmsg exists in the container (bind of a host node) but is not listed: still denied
    cfg["mounts"].append({"destination": "/dev/kmsg", "type": "bind", "source": "/dev/kmsg", "options": ["bind"]})
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    assert f"c {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} rwm" in out.splitlines()
    assert "opened" in out.splitlines()
    assert "kmsg-denied" in out.splitlines()


def test_remove_is_retryable_when_the_cgroup_cannot_be_removed(agent, busybox_rootfs, container_id):
    create(agent, container_id, make_spec(busybox_rootfs, ["sleep", "1000"]))
    agent.client.call("StartContainer", {"container_id": container_id})
    blocker = _cgroup_dir(MEMORY_V1, container_id) / "blocker"
    blocker.mkdir()  # a child cgroup: rmdir of the container's cgroup fails with EBUSY
    try:
        with pytest.raises(grpc.RpcError) as err:
            agent.client.call("RemoveContainer", {"container_id": container_id})
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # still registered, stopped: its status and wait still answer
        assert agent.client.call("WaitProcess", {"container_id": container_id}).status == 137
    finally:
        blocker.rmdir()
    agent.client.call("RemoveContainer", {"container_id": container_id})
    assert not [p for p in MEMORY_V1.glob(f"**/{container_id}")]
    with pytest.raises(grpc.RpcError) as err:
        agent.client.call("WaitProcess", {"container_id": container_id})
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    create(agent, container_id, make_spec(busybox_rootfs, ["true"]))  # the id is free again
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_process_starts_with_no_ignored_or_blocked_signals(agent, busybox_rootfs, container_id):
    status, out, err = run(agent, container_id, make_spec(
        busybox_rootfs, ["sh", "-c", "exec grep -E '^Sig(Ign|Blk)' /proc/self/status"]))
    assert status == 0, err
    assert out.split() == ["SigBlk:", "0000000000000000", "SigIgn:", "0000000000000000"]


def test_kill_all_kills_a_paused_container(agent, busybox_rootfs, container_id):
    create(agent, container_id, make_spec(busybox_rootfs, ["sh", "-c", "sleep 1000 & sleep 1000; wait"]))
    agent.client.call("StartContainer", {"container_id": container_id})
    agent.client.call("PauseContainer", {"container_id": container_id})
    agent.client.call("SignalProcess", {"container_id": container_id, "signal": 9})
    assert agent.client.call("WaitProcess", {"container_id": container_id}).status == 137
    cg = _cgroup_dir(MEMORY_V1, container_id)
    assert (cg / "cgroup.procs").read_text().split() == []
    agent.client.call("RemoveContainer", {"container_id": container_id})


SPAWNER_AS_CHILD_OF_PID1 = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from agent.runtime import spawner
assert os.getpid() == 1
sp = spawner.start_spawner()
time.sleep(0.5)
print("alive" if os.waitpid(sp.pid, os.WNOHANG) == (0, 0) else "gone")
sp.close()
os.waitpid(sp.pid, 0)
"""


def test_spawner_stays_up_when_the_agent_is_pid_1():
    """In the guest the agent is PID 1: its spawner's parent pid is 1 and that is no orphaning."""
    import subprocess
    import sys

    root = str(pathlib.Path(__file__).resolve().parents[2])
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--mount-proc", sys.executable, "-c",
                           SPAWNER_AS_CHILD_OF_PID1, root], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["alive"]
