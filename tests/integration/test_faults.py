"""Faults: a container killed from outside, a fork bomb under a pids limit, an OOM kill, clients
that vanish in the middle of a long poll, a storage that fails halfway through CreateContainer,
and device waits that time out. After each: no leaked mount, cgroup, fd, thread, child, zombie
or state entry, and the id is reusable (the same lifecycle runs again under the same id).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time

import grpc
import pytest

from agent.protocols import agent_pb2, oci_pb2
from tests.support import make_busybox_rootfs
from tests.reliability.containers import create, read_all, run, spec, status_of
from tests.reliability.invariants import AgentState, Checkpoint, MachineState
from tests.reliability.isolated import IsolatedAgent

pytestmark = pytest.mark.timeout(180)
HOTPLUG_TIMEOUT = 1.5
CIDS = ("killed", "bomb", "oom", "poll-readstdout", "poll-readstderr", "poll-waitprocess", "execkill",
        "halfway", "nodev", "nodisk")


class World:
    def __init__(self, work) -> None:
        self.agent = IsolatedAgent(work / "agent", ["--hotplug-timeout", str(HOTPLUG_TIMEOUT)])
        self.client = self.agent.client
        self.rootfs = make_busybox_rootfs(self.agent.work / "rootfs")
        self.machine = MachineState.take()
        # warm up: the first lifecycle opens what the agent keeps for good
        assert run(self.client, "warm", spec(self.rootfs, ["true"]))[0] == 0

    def pids_of(self, cid: str) -> list[int]:
        """Processes in the container's cgroup (pids hierarchy), as the machine numbers them."""
        for root in self.agent.cgroup_roots:
            if "/pids/" not in root + "/":
                continue
            for dirpath, _, _ in os.walk(root):
                if os.path.basename(dirpath) == cid:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        return [int(p) for p in f.read().split()]
        return []

    def reusable(self, cid: str) -> None:
        status, out, _ = run(self.client, cid, spec(self.rootfs, ["echo", "again"]))
        assert (status, out) == (0, "again\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("faults"))
    yield w
    rc = w.agent.stop()
    assert rc == 0, w.agent.logs()[-3000:]
    assert not w.machine.diff(MachineState.take())


@pytest.fixture
def clean(world):
    checkpoint = Checkpoint(world.agent, world.machine)
    yield world
    for cid in CIDS:  # what a failed test left behind, so that the next one starts clean
        try:
            world.client.call("RemoveContainer", {"container_id": cid, "timeout": 5})
        except grpc.RpcError:
            pass
    checkpoint.assert_back()


def test_container_killed_from_outside(clean):
    w = clean
    cid = "killed"
    create(w.client, cid, spec(w.rootfs, ["sleep", "1000"]))
    w.client.call("StartContainer", {"container_id": cid})
    pids = w.pids_of(cid)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    status = w.client.call("WaitProcess", {"container_id": cid}, timeout=20).status
    assert status == 128 + signal.SIGKILL
    w.client.call("RemoveContainer", {"container_id": cid})
    w.reusable(cid)


def _pids_cgroup(w, cid: str) -> str:
    for root in w.agent.cgroup_roots:
        if "/pids/" in root + "/":
            for dirpath, _, _ in os.walk(root):
                if os.path.basename(dirpath) == cid:
                    return dirpath
    raise AssertionError(f"no pids cgroup for {cid}")


def test_fork_bomb_within_pids_limit(clean):
    """Forks until the pids limit refuses them (busybox sh gives up on a failed fork; an outer
    loop starts it again): the limit holds, the agent keeps answering, removal kills them all."""
    w = clean
    cid = "bomb"
    oci = spec(w.rootfs, ["sh", "-c", "while :; do sh -c 'while :; do sleep 60 & done' 2>/dev/null; done"])
    oci.Linux.Resources.Pids.Limit = 32
    create(w.client, cid, oci)
    w.client.call("StartContainer", {"container_id": cid})
    cg = _pids_cgroup(w, cid)
    deadline = time.monotonic() + 20
    most = 0
    while time.monotonic() < deadline:
        most = max(most, len(w.pids_of(cid)))
        with open(os.path.join(cg, "pids.events")) as f:
            refused = int(f.read().split()[1])
        if refused > 100 and most >= 30:
            break
        time.sleep(0.1)
    assert 30 <= most <= 32 and refused > 100, (most, refused)
    assert w.client.health() == "SERVING"
    stats = w.client.call("StatsContainer", {"container_id": cid})
    assert 0 < stats.cgroup_stats.pids_stats.current <= 32
    w.client.call("RemoveContainer", {"container_id": cid, "timeout": 10})
    assert not os.path.exists(cg)
    w.reusable(cid)


def test_oom_kill_is_reported(clean):
    w = clean
    cid = "oom"
    oci = spec(w.rootfs, ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=256M count=1; echo survived"])
    oci.Linux.Resources.Memory.Limit = 32 << 20
    with cf.ThreadPoolExecutor(1) as pool:
        event = pool.submit(w.client.call, "GetOOMEvent", {}, timeout=30)
        create(w.client, cid, oci)
        w.client.call("StartContainer", {"container_id": cid})
        status = w.client.call("WaitProcess", {"container_id": cid}, timeout=30).status
        assert event.result().container_id == cid
    out = read_all(w.client, cid)
    assert b"survived" in out  # dd was killed, the shell went on
    assert status == 0
    w.client.call("RemoveContainer", {"container_id": cid})
    w.reusable(cid)


def _cancelled(w, method: str, req: dict, proto: str) -> None:
    """Start ``method`` on its own connection, then drop the connection while it waits."""
    from kata_agent_client import AgentClient

    other = AgentClient(w.agent.addr, proto=proto)
    ended: list = []

    def wait() -> None:
        try:
            other.call(method, req, timeout=60)
            ended.append("returned")
        except grpc.RpcError as exc:
            ended.append(exc.code())

    thread = threading.Thread(target=wait)
    before = _cancelled_count(w, method)
    thread.start()
    time.sleep(0.5)
    assert not ended, "the call should still be waiting"
    other.close()
    thread.join(10)
    assert ended and ended[0] != "returned"
    # the agent sees the hang-up a moment later (for gRPC through grpcio's own threads): wait
    # until it has counted the call as cancelled, so that no handler of it is left waiting
    deadline = time.monotonic() + 10
    while _cancelled_count(w, method) == before:
        assert time.monotonic() < deadline, f"{method} on a closed {proto} connection was never cancelled"
        time.sleep(0.01)


def _cancelled_count(w, method: str) -> float:
    text = w.client.call("GetMetrics", {}).metrics
    key = f'kata_agent_rpc_requests_total{{code="CANCELLED",method="{method}"}} '
    return sum(float(line[len(key):]) for line in text.splitlines() if line.startswith(key))


@pytest.mark.parametrize("proto", ["ttrpc", "grpc"])
@pytest.mark.parametrize("method", ["ReadStdout", "ReadStderr", "WaitProcess"])
def test_client_disconnects_during_long_poll(clean, method, proto):
    w = clean
    cid = "poll-" + method.lower()
    oci = spec(w.rootfs, ["sh", "-c", "read line; echo out:$line; echo err:$line >&2; exit 7"])
    create(w.client, cid, oci)
    w.client.call("StartContainer", {"container_id": cid})
    req = {"container_id": cid} if method == "WaitProcess" else {"container_id": cid, "len": 100}
    for _ in range(3):
        _cancelled(w, method, req, proto)
    # the abandoned waits took nothing: output and status reach the next caller intact
    w.client.call("WriteStdin", agent_pb2.WriteStreamRequest(container_id=cid, data=b"x\n"))
    assert w.client.call("WaitProcess", {"container_id": cid}, timeout=20).status == 7
    assert read_all(w.client, cid) == b"out:x\n"
    assert read_all(w.client, cid, "ReadStderr") == b"err:x\n"
    w.client.call("RemoveContainer", {"container_id": cid})
    w.reusable(cid)


def test_exec_killed_from_outside_and_exec_id_reusable(clean):
    w = clean
    cid = "execkill"
    create(w.client, cid, spec(w.rootfs, ["sleep", "1000"]))
    w.client.call("StartContainer", {"container_id": cid})
    before = set(w.pids_of(cid))
    w.client.call("ExecProcess", agent_pb2.ExecProcessRequest(
        container_id=cid, exec_id="e1", process=oci_pb2.Process(Args=["sleep", "1000"], Cwd="/")))
    deadline = time.monotonic() + 10
    while not set(w.pids_of(cid)) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    (pid,) = set(w.pids_of(cid)) - before
    os.kill(pid, signal.SIGKILL)
    assert w.client.call("WaitProcess", {"container_id": cid, "exec_id": "e1"}, timeout=20).status == 137
    w.client.call("RemoveContainer", {"container_id": cid, "timeout": 5})
    w.reusable(cid)


def test_exec_id_reusable_after_wait(clean):
    """Kata's agent forgets an exec process once WaitProcess has returned its status, so the id
    can be used again and a long-lived container does not accumulate finished execs."""
    w = clean
    cid = "execkill"
    create(w.client, cid, spec(w.rootfs, ["sleep", "1000"]))
    w.client.call("StartContainer", {"container_id": cid})
    for status in (3, 4):
        w.client.call("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id=cid, exec_id="e1", process=oci_pb2.Process(Args=["sh", "-c", f"exit {status}"], Cwd="/")))
        assert w.client.call("WaitProcess", {"container_id": cid, "exec_id": "e1"}, timeout=20).status == status
    w.client.call("RemoveContainer", {"container_id": cid, "timeout": 5})


@pytest.fixture
def sandbox(clean):
    clean.client.call("CreateSandbox", {"hostname": "faults", "sandbox_id": "sbf"})
    yield clean
    clean.client.call("DestroySandbox", {})


def test_second_storage_fails_to_mount(sandbox):
    w = sandbox
    mounts = AgentState.take(w.agent.pid).mounts
    good = agent_pb2.Storage(driver="ephemeral", source="tmpfs", fstype="tmpfs",
                             mount_point="/run/kata-containers/sandbox/ephemeral/good")
    bad = agent_pb2.Storage(driver="bind", source=str(w.agent.work / "does-not-exist"), fstype="bind",
                            options=["bind"], mount_point="/run/kata-containers/shared/containers/bad")
    req = agent_pb2.CreateContainerRequest(container_id="halfway", OCI=spec(w.rootfs, ["true"]),
                                           storages=[good, bad])
    code, msg = status_of(w.client.call, "CreateContainer", req)
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN) and msg, (code, msg)
    assert "storages[1]" in msg, msg
    assert AgentState.take(w.agent.pid).mounts == mounts  # the first storage was unmounted again
    # the same id, with storages that work
    req = agent_pb2.CreateContainerRequest(container_id="halfway", OCI=spec(w.rootfs, ["true"]),
                                           storages=[good])
    w.client.call("CreateContainer", req)
    w.client.call("StartContainer", {"container_id": "halfway"})
    assert w.client.call("WaitProcess", {"container_id": "halfway"}).status == 0
    w.client.call("RemoveContainer", {"container_id": "halfway"})
    assert AgentState.take(w.agent.pid).mounts == mounts


# A PCI path makes the agent rescan the PCI bus (/sys/bus/pci/rescan), which is read-only for the
# confined agent: the machine's bus is not rescanned from here. tests/vm covers PCI waits.
@pytest.mark.parametrize("device", [
    {"type": "blk", "vm_path": "/dev/vdzz", "container_path": "/dev/xda"},
    {"type": "scsi", "id": "9:9", "container_path": "/dev/xdb"},
])
def test_device_wait_times_out(sandbox, device):
    w = sandbox
    req = agent_pb2.CreateContainerRequest(container_id="nodev", OCI=spec(w.rootfs, ["true"]),
                                           devices=[agent_pb2.Device(**device)])
    start = time.monotonic()
    code, msg = status_of(w.client.call, "CreateContainer", req)
    took = time.monotonic() - start
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "devices[0]" in msg, (code, msg)
    assert HOTPLUG_TIMEOUT * 0.9 <= took < HOTPLUG_TIMEOUT + 5, took
    w.reusable("nodev")


def test_blk_storage_wait_times_out(sandbox):
    w = sandbox
    st = agent_pb2.Storage(driver="blk", source="/dev/vdzz", fstype="ext4",
                           mount_point="/run/kata-containers/shared/containers/nodisk")
    req = agent_pb2.CreateContainerRequest(container_id="nodisk", OCI=spec(w.rootfs, ["true"]), storages=[st])
    code, msg = status_of(w.client.call, "CreateContainer", req)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "storages[0]" in msg, (code, msg)
    w.reusable("nodisk")
