"""Resource RPCs against a real agent: limits in the cgroup files, UpdateContainer, StatsContainer,
PauseContainer/ResumeContainer and GetOOMEvent.

Containers get Linux.CgroupsPath ``/kata-agent-test-<random>/<id>``; after the agent has stopped, a
finalizer checks that nothing is left under that parent in any hierarchy, and removes what is.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import grpc
import pytest
from google.protobuf import json_format

from agent.runtime import cgroups
from kata_agent_client.spec import default_config, spec_from_config
from tests.integration.test_cgroups import remove_tree

pytestmark = pytest.mark.timeout(120)

LAYOUT = cgroups.detect().layout


class CgroupParent:
    def __init__(self) -> None:
        self.name = f"kata-agent-test-{uuid.uuid4().hex[:10]}"

    def path(self, cid: str) -> str:
        return f"/{self.name}/{cid}"

    def file(self, controller: str, cid: str, name: str) -> str:
        route = LAYOUT.route(controller)
        assert route is not None, f"no {controller} controller here"
        with open(os.path.join(route.root, self.name, cid, name)) as f:
            return f.read().strip()

    def leftovers(self) -> list[str]:
        return [p for p in (os.path.join(r, self.name) for r in LAYOUT.roots()) if os.path.exists(p)]


@pytest.fixture
def cgparent():
    """Request it before ``agent`` so that it is checked after the agent has stopped."""
    parent = CgroupParent()
    yield parent
    left = parent.leftovers()
    for path in left:
        for directory, _, names in os.walk(path):
            if "cgroup.procs" in names:
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        os.kill(int(pid), signal.SIGKILL)
        remove_tree(path)
    assert not left, f"cgroups left behind: {left}"


def create(agent, parent: CgroupParent, cid: str, rootfs, args: list[str], **resources) -> None:
    cfg = default_config(args, rootfs=str(rootfs))
    cfg["linux"]["cgroupsPath"] = parent.path(cid)
    cfg["linux"]["resources"].update(resources)
    spec = json_format.MessageToDict(spec_from_config(cfg))
    agent.client.call("CreateContainer", {"container_id": cid, "OCI": spec})


def call(agent, method: str, cid: str, **extra):
    return agent.client.call(method, {"container_id": cid, **extra})


def status_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def init_pid(parent: CgroupParent, cid: str) -> int:
    return int(parent.file("freezer", cid, "cgroup.procs").split()[0])


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_limits_update_and_stats(cgparent, agent, busybox_rootfs, container_id):
    script = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; echo done; exec sleep 100"
    create(agent, cgparent, container_id, busybox_rootfs, ["sh", "-c", script],
           memory={"limit": 64 << 20}, pids={"limit": 30}, cpu={"shares": 256})
    assert cgparent.file("memory", container_id, "memory.limit_in_bytes") == str(64 << 20)
    assert cgparent.file("pids", container_id, "pids.max") == "30"
    assert cgparent.file("cpu", container_id, "cpu.shares") == "256"
    call(agent, "StartContainer", container_id)
    assert call(agent, "ReadStdout", container_id, len=100).data == b"done\n"

    st = call(agent, "StatsContainer", container_id).cgroup_stats
    assert st.cpu_stats.cpu_usage.total_usage > 1_000_000
    assert st.memory_stats.usage.usage > 0
    assert st.memory_stats.usage.limit == 64 << 20
    assert (st.pids_stats.current, st.pids_stats.limit) == (1, 30)

    call(agent, "UpdateContainer", container_id,
         resources={"Memory": {"Limit": str(32 << 20)}, "Pids": {"Limit": "10"}})
    assert cgparent.file("memory", container_id, "memory.limit_in_bytes") == str(32 << 20)
    assert cgparent.file("pids", container_id, "pids.max") == "10"

    code, details = status_of(lambda: call(agent, "UpdateContainer", container_id,
                                           resources={"Pids": {"Limit": "5"}, "CPU": {"Cpus": "x"}}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("resources.CPU.Cpus: invalid cpu list")
    assert cgparent.file("pids", container_id, "pids.max") == "10"

    code, _ = status_of(lambda: call(agent, "StatsContainer", "no-such-container"))
    assert code == grpc.StatusCode.NOT_FOUND
    call(agent, "RemoveContainer", container_id)


def test_pause_and_resume(cgparent, agent, busybox_rootfs, container_id):
    create(agent, cgparent, container_id, busybox_rootfs, ["sleep", "100"])
    call(agent, "StartContainer", container_id)
    pid = init_pid(cgparent, container_id)

    code, details = status_of(lambda: call(agent, "ResumeContainer", container_id))
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION,
                               f"container {container_id} is not paused")
    call(agent, "PauseContainer", container_id)
    if LAYOUT.route("freezer").version == 1:
        assert cgparent.file("freezer", container_id, "freezer.state") == "FROZEN"
        assert proc_state(pid) == "D"
    else:
        assert "frozen 1" in cgparent.file("freezer", container_id, "cgroup.events")
    code, _ = status_of(lambda: call(agent, "PauseContainer", container_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION

    call(agent, "ResumeContainer", container_id)
    deadline = time.monotonic() + 5  # thawed: it runs, then sleeps again
    while proc_state(pid) != "S":
        assert time.monotonic() < deadline, f"state {proc_state(pid)!r} 5 s after ResumeContainer"
        time.sleep(0.01)
    call(agent, "PauseContainer", container_id)
    call(agent, "RemoveContainer", container_id)  # removing a paused container works
    assert not cgparent.leftovers()


def test_oom_event_for_a_container_over_its_limit(cgparent, agent, busybox_rootfs, container_id):
    create(agent, cgparent, container_id, busybox_rootfs,
           ["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
           memory={"limit": 20 << 20})
    events: list = []
    waiter = threading.Thread(target=lambda: events.append(agent.client.call("GetOOMEvent", {})),
                              daemon=True)
    waiter.start()
    # The long poll must not block other calls.
    assert call(agent, "StatsContainer", container_id).cgroup_stats.memory_stats.usage.limit == 20 << 20
    call(agent, "StartContainer", container_id)
    assert call(agent, "WaitProcess", container_id).status == 128 + signal.SIGKILL
    waiter.join(30)
    assert [e.container_id for e in events] == [container_id]
    call(agent, "RemoveContainer", container_id)
