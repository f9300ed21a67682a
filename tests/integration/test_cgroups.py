"""agent.runtime.cgroups on this machine's real cgroups (root).

Every cgroup lives under ``kata-agent-test-<random>`` in each hierarchy; a finalizer kills the
processes these tests started and removes that parent everywhere, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import pytest

from agent.errors import FailedPrecondition, InvalidArgument
from agent.protocols import oci_pb2
from agent.runtime import cgroups
from agent.runtime.cgroups import files

pytestmark = pytest.mark.timeout(60)

UNIFIED = "/sys/fs/cgroup/unified"


def remove_tree(path: str) -> None:
    """rmdir a cgroup directory tree deepest first (after thawing it)."""
    if not os.path.isdir(path):
        return
    for directory, _, _ in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            if os.path.exists(os.path.join(directory, name)):
                files.write(os.path.join(directory, name), value)
        for _ in range(100):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


class Sandbox:
    """The test's parent cgroup name, the manager, and the processes the test started."""

    def __init__(self) -> None:
        self.name = f"kata-agent-test-{uuid.uuid4().hex[:10]}"
        self.manager = cgroups.detect()
        self.procs: list[subprocess.Popen] = []

    def path(self, leaf: str) -> str:
        return f"/{self.name}/{leaf}"

    def everywhere(self) -> list[str]:
        return [os.path.join(root, self.name) for root in self.manager.layout.roots()]

    def spawn(self, cg: cgroups.Cgroup | None, *argv: str, stdin=None) -> subprocess.Popen:
        proc = subprocess.Popen(list(argv), stdin=stdin, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        if cg is not None:
            for procs_file in cg.procs_files():
                files.write(procs_file, str(proc.pid))
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.manager.close()
        for path in self.everywhere():
            remove_tree(path)


@pytest.fixture
def box():
    sandbox = Sandbox()
    yield sandbox
    sandbox.cleanup()
    assert not [p for p in sandbox.everywhere() if os.path.exists(p)]


def res(**groups) -> oci_pb2.LinuxResources:
    r = oci_pb2.LinuxResources()
    for name, values in groups.items():
        for key, value in values.items():
            setattr(getattr(r, name), key, value)
    return r


def read(cg: cgroups.Cgroup, controller: str, name: str) -> str:
    return files.read(os.path.join(cg.dir_of(controller), name)).strip()


def test_create_applies_limits_joins_and_destroy_removes_everything(box):
    r = res(Memory={"Limit": 64 << 20, "Reservation": 32 << 20, "Swappiness": 10},
            CPU={"Shares": 512, "Quota": 50000, "Period": 100000, "Cpus": "0", "Mems": "0"},
            Pids={"Limit": 20})
    r.Devices.add(Allow=False, Access="rwm")
    cg = box.manager.create(box.path("c1"), r, owner="c1")
    assert all(os.path.isdir(d) for d in cg.dirs)
    assert read(cg, "memory", "memory.limit_in_bytes") == str(64 << 20)
    assert read(cg, "memory", "memory.soft_limit_in_bytes") == str(32 << 20)
    assert read(cg, "memory", "memory.swappiness") == "10"
    assert read(cg, "cpu", "cpu.shares") == "512"
    assert (read(cg, "cpu", "cpu.cfs_quota_us"), read(cg, "cpu", "cpu.cfs_period_us")) == (
        "50000", "100000")
    assert (read(cg, "cpuset", "cpuset.cpus"), read(cg, "cpuset", "cpuset.mems")) == ("0", "0")
    assert read(cg, "pids", "pids.max") == "20"
    assert "c 1:3 rwm" in read(cg, "devices", "devices.list").splitlines()
    assert "a *:* rwm" not in read(cg, "devices", "devices.list")

    sleeper = box.spawn(cg, "sleep", "30")
    assert cg.pids() == [sleeper.pid]
    with open(f"/proc/{sleeper.pid}/cgroup") as f:
        assert f"/{box.name}/c1" in f.read()
    assert os.sched_getaffinity(sleeper.pid) == {0}

    with pytest.raises(FailedPrecondition, match="still has processes"):
        cg.destroy(timeout=0.05)
    sleeper.kill()
    sleeper.wait()
    cg.destroy()
    assert not [p for p in box.everywhere() if os.path.exists(p)]
    cg.destroy()  # idempotent


def test_update_live_and_refusals_change_nothing(box):
    cg = box.manager.create(box.path("c1"), res(Memory={"Limit": 64 << 20}, Pids={"Limit": 20}),
                            owner="c1")
    sleeper = box.spawn(cg, "sleep", "30")
    cg.update(res(Memory={"Limit": 32 << 20}, Pids={"Limit": 5}, CPU={"Cpus": "1"}))
    assert read(cg, "memory", "memory.limit_in_bytes") == str(32 << 20)
    assert read(cg, "pids", "pids.max") == "5"
    assert os.sched_getaffinity(sleeper.pid) == {1}

    with pytest.raises(InvalidArgument, match=r"^resources\.CPU\.Cpus: invalid cpu list 'x'"):
        cg.update(res(Memory={"Limit": 16 << 20}, CPU={"Cpus": "x"}))
    assert read(cg, "memory", "memory.limit_in_bytes") == str(32 << 20)

    # Valid syntax the kernel refuses: the memory limit written before it is put back.
    cpus = os.cpu_count() or 1
    with pytest.raises(InvalidArgument, match=rf"^resources\.CPU\.Cpus: '{cpus + 7}' rejected"):
        cg.update(res(Memory={"Limit": 16 << 20}, CPU={"Cpus": str(cpus + 7)}))
    assert read(cg, "memory", "memory.limit_in_bytes") == str(32 << 20)
    assert read(cg, "cpuset", "cpuset.cpus") == "1"

    pids_max = res(Pids={"Limit": -1})
    cg.update(pids_max)
    assert read(cg, "pids", "pids.max") == "max"


def test_memory_limit_below_usage_is_refused(box):
    cg = box.manager.create(box.path("c1"), None, owner="c1")
    gate_r, gate_w = os.pipe()
    hog = box.spawn(cg, sys.executable, "-c",
                    "import os,sys; b = bytearray(30 << 20); os.write(1, b'x'); sys.stdin.read()",
                    stdin=gate_r)
    os.close(gate_r)
    deadline = time.monotonic() + 10
    while int(read(cg, "memory", "memory.usage_in_bytes")) < (20 << 20):
        assert time.monotonic() < deadline and hog.poll() is None
        time.sleep(0.02)
    with pytest.raises(InvalidArgument, match=r"^resources\.Memory\.Limit: .*below the current usage"):
        cg.update(res(Memory={"Limit": 4 << 20}))
    assert hog.poll() is None
    os.close(gate_w)


def test_stats_after_cpu_work(box):
    cg = box.manager.create(box.path("c1"), res(Pids={"Limit": 50}), owner="c1")
    gate_r, gate_w = os.pipe()
    # user time is counted by timer ticks: after its memory, the worker spins until the kernel has
    # counted some (a fixed amount of work may be counted as system time alone on a busy machine)
    worker = box.spawn(cg, sys.executable, "-c",
                       "import os, sys; sys.stdin.read(1); x = [i * i for i in range(300000)]\n"
                       "while os.times().user < 0.05: pass", stdin=gate_r)
    os.close(gate_r)
    os.write(gate_w, b"go")
    os.close(gate_w)
    assert worker.wait(30) == 0
    st = cg.stats()
    assert st.cpu_stats.cpu_usage.total_usage > 10_000_000  # > 10 ms of CPU
    assert sum(st.cpu_stats.cpu_usage.percpu_usage) == st.cpu_stats.cpu_usage.total_usage
    assert st.cpu_stats.cpu_usage.usage_in_usermode > 0
    assert st.memory_stats.usage.max_usage > 1 << 20
    assert st.memory_stats.usage.limit > 0 and st.memory_stats.stats["pgfault"] > 0
    assert (st.pids_stats.current, st.pids_stats.limit) == (0, 50)


def _counter_grows(path: str, wait: float = 0.3) -> bool:
    before = os.path.getsize(path)
    time.sleep(wait)
    return os.path.getsize(path) > before


def _freeze_thaw(box: Sandbox, cg: cgroups.Cgroup, tmp_path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("")
    ticker = box.spawn(cg, "sh", "-c", f"while :; do echo x >> {counter}; sleep 0.01; done")
    deadline = time.monotonic() + 5
    while os.path.getsize(counter) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    asyncio.run(cg.freeze())
    assert cg.is_frozen()
    assert not _counter_grows(counter)
    if cg.manager.version("freezer") == 1:  # v2 freezes in a signal-like trap, shown as S
        with open(f"/proc/{ticker.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in ("D", "T")
    cg.thaw()
    assert not cg.is_frozen()
    assert _counter_grows(counter)


def test_freeze_and_thaw_v1(box, tmp_path):
    cg = box.manager.create(box.path("c1"), None, owner="c1")
    _freeze_thaw(box, cg, tmp_path)
    assert cg.kill_all() >= 1  # the shell and maybe its sleep
    box.procs[-1].wait(5)
    cg.destroy()


def test_kill_all_reaches_a_frozen_cgroup(box):
    cg = box.manager.create(box.path("c1"), None, owner="c1")
    sleeper = box.spawn(cg, "sleep", "30")
    asyncio.run(cg.freeze())
    assert cg.kill_all() == 1
    assert sleeper.wait(5) == -9
    cg.destroy()


def test_oom_kill_is_reported_with_the_owner(box):
    async def scenario() -> str:
        cg = box.manager.create(box.path("hog"), res(Memory={"Limit": 20 << 20}), owner="hog-1")
        gate_r, gate_w = os.pipe()
        hog = box.spawn(cg, sys.executable, "-c",
                        "import sys; sys.stdin.read(1); b = bytearray(200 << 20)", stdin=gate_r)
        os.close(gate_r)
        os.write(gate_w, b"go")
        os.close(gate_w)
        owner = await asyncio.wait_for(box.manager.next_oom_event(), 20)
        assert hog.wait(10) == -9
        st = cg.stats()
        assert st.memory_stats.usage.failcnt > 0
        cg.destroy()
        await asyncio.sleep(0.05)  # the rmdir notification must not become an event
        assert box.manager.oom.queue().empty()
        return owner

    assert asyncio.run(scenario()) == "hog-1"


@pytest.mark.parametrize("groups, message", [
    ({"CPU": {"Cpus": "x"}}, r"^OCI\.Linux\.Resources\.CPU\.Cpus: invalid cpu list 'x'"),
    ({"CPU": {"Cpus": "63"}}, r"^OCI\.Linux\.Resources\.CPU\.Cpus: '63' rejected by the kernel"),
    ({"Memory": {"Limit": -5}}, r"^OCI\.Linux\.Resources\.Memory\.Limit: -5 is negative"),
    ({"CPU": {"Shares": 1}}, r"^OCI\.Linux\.Resources\.CPU\.Shares"),
])
def test_bad_values_leave_nothing_behind(box, groups, message):
    with pytest.raises(InvalidArgument, match=message):
        box.manager.create(box.path("bad"), res(Pids={"Limit": 9}, **groups), owner="bad")
    assert not [p for p in box.everywhere() if os.path.exists(p)]
    assert not box.manager.owned


def test_shared_parent_goes_with_the_last_child(box):
    a = box.manager.create(box.path("mid/a"), None, owner="a")
    b = box.manager.create(box.path("mid/b"), None, owner="b")
    a.destroy()
    assert all(os.path.isdir(os.path.join(root, box.name, "mid/b")) for root in
               box.manager.layout.roots())
    b.destroy()
    assert not [p for p in box.everywhere() if os.path.exists(p)]


def test_pre_existing_leaf_is_joined_but_not_removed(box):
    for parent in box.everywhere():
        os.makedirs(os.path.join(parent, "kept"))
    cpuset_root = box.manager.layout.v1.get("cpuset")
    if cpuset_root:  # a v1 cpuset made by hand needs its cpus and mems before use
        for d in (os.path.join(cpuset_root, box.name), os.path.join(cpuset_root, box.name, "kept")):
            files.write(os.path.join(d, "cpuset.cpus"), "0")
            files.write(os.path.join(d, "cpuset.mems"), "0")
    cg = box.manager.create(box.path("kept"), res(Pids={"Limit": 3}), owner="k")
    assert read(cg, "pids", "pids.max") == "3"
    cg.destroy()
    assert all(os.path.isdir(os.path.join(p, "kept")) for p in box.everywhere())


# ---- the v2 code path, on this machine's cgroup2 mount (no controllers enabled there) ----


@pytest.fixture
def v2box():
    if not os.path.exists(os.path.join(UNIFIED, "cgroup.procs")):
        pytest.skip("no cgroup2 mount at " + UNIFIED)
    sandbox = Sandbox()
    top = os.path.join(UNIFIED, sandbox.name)
    os.mkdir(top)
    sandbox.manager = cgroups.detect(root=top)
    yield sandbox
    sandbox.cleanup()
    remove_tree(top)
    assert not os.path.exists(top)


def test_v2_create_freeze_destroy(v2box, tmp_path):
    m = v2box.manager
    assert m.mode == "v2"
    cg = m.create("system.slice:kata:c1", None, owner="c1")
    top = m.layout.v2
    assert cg.dirs == [os.path.join(top, "system.slice/kata-c1.scope")]
    assert cg.procs_files() == [os.path.join(cg.dirs[0], "cgroup.procs")]
    _freeze_thaw(v2box, cg, tmp_path)
    assert v2box.procs[-1].pid in cg.pids()
    st = cg.stats()
    assert st.cpu_stats.cpu_usage.total_usage > 0  # cpu.stat is core on v2
    cg.kill_all()
    v2box.procs[-1].wait(5)
    cg.destroy()
    assert not [n for n in os.listdir(top) if os.path.isdir(os.path.join(top, n))]


def test_v2_unavailable_controller_is_refused_cleanly(v2box):
    m = v2box.manager
    with pytest.raises(InvalidArgument, match=r"^OCI\.Linux\.Resources\.Memory: the memory cgroup "
                                              r"controller is not available"):
        m.create("/x/y", res(Memory={"Limit": 1 << 20}), owner="o")
    assert not os.path.exists(os.path.join(m.layout.v2, "x"))
    cg = m.create("/x/y", None, owner="o")
    cg.destroy()
    assert not os.path.exists(os.path.join(m.layout.v2, "x"))


PROBE = """import os, sys
sys.stdin.read(1)
for path, flags in (("/dev/null", os.O_RDWR), ("/dev/kmsg", os.O_RDONLY), ("/dev/kmsg", os.O_WRONLY),
                    ("/dev/tty1", os.O_RDONLY)):
    try:
        os.close(os.open(path, flags))
        print("ok")
    except OSError as exc:
        print(exc.strerror)
"""


def _probe_devices(box: Sandbox, cg: cgroups.Cgroup) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    box.procs.append(proc)
    for procs_file in cg.procs_files():
        files.write(procs_file, str(proc.pid))
    out, _ = proc.communicate("x", timeout=20)
    return out.splitlines()


def test_v2_device_rules_are_an_ebpf_filter(v2box):
    """deny all, allow /dev/kmsg read-only (+ the defaults, /dev/null among them); an update
    replaces the filter."""
    r = oci_pb2.LinuxResources()
    r.Devices.add(Allow=False, Access="rwm")
    r.Devices.add(Allow=True, Type="c", Major=1, Minor=11, Access="r")
    cg = v2box.manager.create("c1", r, owner="c1")
    denied = "Operation not permitted"
    assert _probe_devices(v2box, cg) == ["ok", "ok", denied, denied]
    r.Devices[1].Access = "rw"
    cg.update(r)
    assert _probe_devices(v2box, cg) == ["ok", "ok", "ok", denied]
    cg.destroy()
    assert cg.bpf_fd == -1
