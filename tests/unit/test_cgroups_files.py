"""apply / stats / OOM watching against fake cgroup files in a temporary directory (no root)."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from agent.errors import InvalidArgument
from agent.protocols import oci_pb2
from agent.runtime.cgroups import apply as applymod
from agent.runtime.cgroups import files, oom, stats
from agent.runtime.cgroups.plan import Plan, Write, make_plan


def fake(d, **contents: str) -> None:
    for name, text in contents.items():
        (d / name.replace("__", ".")).write_text(text)


def test_apply_writes_first_existing_target_and_skips_optional(tmp_path):
    fake(tmp_path, io__weight="default 100\n", pids__max="max\n")
    res = oci_pb2.LinuxResources()
    res.BlockIO.Weight = 500
    res.Pids.Limit = 7
    res.BlockIO.LeafWeight = 20
    plan = make_plan(res, lambda c: 2)
    applymod.apply(plan, lambda c: str(tmp_path), "OCI.Linux.Resources")
    assert (tmp_path / "io.weight").read_text() == "4950"
    assert (tmp_path / "pids.max").read_text() == "7"


def test_apply_missing_required_file_names_field(tmp_path):
    res = oci_pb2.LinuxResources()
    res.HugepageLimits.add(Pagesize="64KB", Limit=1)
    with pytest.raises(InvalidArgument, match=r"^p\.HugepageLimits\[0\]: not supported by this "
                                              r"kernel \(hugetlb\.64KB\.max is missing\)"):
        applymod.apply(make_plan(res, lambda c: 2, "p"), lambda c: str(tmp_path), "p")


def test_keep_quota_prefixes_current_quota(tmp_path):
    fake(tmp_path, cpu__max="20000 100000\n")
    res = oci_pb2.LinuxResources()
    res.CPU.Period = 50000
    applymod.apply(make_plan(res, lambda c: 2), lambda c: str(tmp_path), "r")
    assert (tmp_path / "cpu.max").read_text() == "20000 50000"


def test_swap_on_einval_retries_after_the_next_write(tmp_path, monkeypatch):
    order: list[tuple[str, str]] = []
    failed = []

    def write(self, path, value):
        name = os.path.basename(path)
        if name == "a" and not failed:
            failed.append(1)
            raise OSError(errno.EINVAL, "Invalid argument")
        order.append((name, value))

    fake(tmp_path, a="", b="")
    monkeypatch.setattr(files.Writer, "write", write)
    plan = Plan([Write("m", (("a", "1"),), "A", swap_on_einval=True), Write("m", (("b", "2"),), "B")])
    applymod.apply(plan, lambda c: str(tmp_path), "p")
    assert order == [("b", "2"), ("a", "1")]


def test_swap_on_einval_pair_in_order_when_both_succeed(tmp_path):
    fake(tmp_path, a="", b="", c="")
    plan = Plan([Write("m", (("a", "1"),), "A", swap_on_einval=True), Write("m", (("b", "2"),), "B"),
                 Write("m", (("c", "3"),), "C")])
    applymod.apply(plan, lambda c: str(tmp_path), "p")
    assert [(tmp_path / n).read_text() for n in "abc"] == ["1", "2", "3"]


@pytest.mark.parametrize("err, text", [(errno.EBUSY, "below the current usage"),
                                       (errno.EINVAL, "rejected by the kernel")])
def test_kernel_refusal_names_field_and_undo_restores(tmp_path, monkeypatch, err, text):
    fake(tmp_path, memory__max="1000\n", memory__low="0\n")
    real = files.Writer.write

    def write(self, path, value):
        if path.endswith("memory.max") and value == "10":
            raise OSError(err, os.strerror(err))
        real(self, path, value)

    monkeypatch.setattr(files.Writer, "write", write)
    plan = Plan([Write("memory", (("memory.low", "5"),), "Memory.Reservation"),
                 Write("memory", (("memory.max", "10"),), "Memory.Limit",
                       busy="below the current usage")])
    undo = applymod.Undo()
    with pytest.raises(InvalidArgument, match=rf"^resources\.Memory\.Limit: '10' {text}"):
        applymod.apply(plan, lambda c: str(tmp_path), "resources", undo)
    assert (tmp_path / "memory.low").read_text() == "5"
    undo.run()
    assert (tmp_path / "memory.low").read_text() == "0"


def test_stats_v1_from_files(tmp_path):
    fake(tmp_path, cpuacct__usage="5000\n", cpuacct__usage_percpu="3000 2000 \n",
         cpuacct__stat="user 3\nsystem 1\n", cpu__stat="nr_periods 10\nnr_throttled 2\nthrottled_time 99\n",
         memory__usage_in_bytes="4096\n", memory__max_usage_in_bytes="8192\n", memory__failcnt="3\n",
         memory__limit_in_bytes="1048576\n", memory__stat="cache 11\nrss 22\n",
         memory__use_hierarchy="1\n", pids__current="4\n", pids__max="max\n",
         blkio__throttle__io_service_bytes_recursive="8:0 Read 512\n8:0 Write 1024\nTotal 1536\n")
    where = lambda c: (str(tmp_path), 1)  # noqa: E731
    out = stats.collect(where, [])
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert out.cpu_stats.cpu_usage.total_usage == 5000
    assert list(out.cpu_stats.cpu_usage.percpu_usage) == [3000, 2000]
    assert out.cpu_stats.cpu_usage.usage_in_usermode == 3 * tick
    assert out.cpu_stats.throttling_data.throttled_periods == 2
    assert out.cpu_stats.throttling_data.throttled_time == 99
    assert (out.memory_stats.usage.usage, out.memory_stats.usage.max_usage) == (4096, 8192)
    assert out.memory_stats.usage.failcnt == 3 and out.memory_stats.usage.limit == 1048576
    assert out.memory_stats.cache == 11 and out.memory_stats.stats["rss"] == 22
    assert out.memory_stats.use_hierarchy
    assert (out.pids_stats.current, out.pids_stats.limit) == (4, 0)
    entries = [(e.major, e.minor, e.op, e.value) for e in out.blkio_stats.io_service_bytes_recursive]
    assert entries == [(8, 0, "Read", 512), (8, 0, "Write", 1024)]


def test_stats_v2_from_files(tmp_path):
    fake(tmp_path, cpu__stat="usage_usec 7\nuser_usec 5\nsystem_usec 2\nnr_periods 4\n"
                             "nr_throttled 1\nthrottled_usec 3\n",
         memory__current="100\n", memory__peak="200\n", memory__max="max\n",
         memory__events="low 0\nhigh 0\nmax 6\noom 1\noom_kill 1\n", memory__stat="file 9\nanon 8\n",
         pids__current="2\n", pids__max="50\n",
         io__stat="8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
         hugetlb__2MB__current="4194304\n", hugetlb__2MB__events="max 1\n")
    out = stats.collect(lambda c: (str(tmp_path), 2), ["2MB", "1GB"])
    assert out.cpu_stats.cpu_usage.total_usage == 7000
    assert out.cpu_stats.cpu_usage.usage_in_kernelmode == 2000
    assert out.cpu_stats.throttling_data.throttled_time == 3000
    mem = out.memory_stats
    assert (mem.usage.usage, mem.usage.max_usage, mem.usage.failcnt) == (100, 200, 6)
    assert mem.usage.limit == files.U64_MAX and mem.cache == 9
    assert (out.pids_stats.current, out.pids_stats.limit) == (2, 50)
    assert [(e.op, e.value) for e in out.blkio_stats.io_service_bytes_recursive] == [
        ("Read", 10), ("Write", 20), ("Discard", 0)]
    assert [(e.op, e.value) for e in out.blkio_stats.io_serviced_recursive][:2] == [
        ("Read", 1), ("Write", 2)]
    assert set(out.hugetlb_stats) == {"2MB"}
    assert out.hugetlb_stats["2MB"].usage == 4194304 and out.hugetlb_stats["2MB"].failcnt == 1


@pytest.mark.parametrize("nbytes, name", [(2 << 20, "2MB"), (1 << 30, "1GB"), (64 << 10, "64KB")])
def test_size_name(nbytes, name):
    assert stats.size_name(nbytes) == name


def test_oom_watcher_v2_counts_oom_kill_increases(tmp_path):
    """inotify on memory.events: only an oom_kill increase is an event, delivered once."""
    events = tmp_path / "memory.events"
    events.write_text("oom 0\noom_kill 0\n")

    async def scenario() -> list[str]:
        watcher = oom.OomWatcher()
        watch = watcher.watch(str(tmp_path), 2, "ctr-1")
        assert watch is not None
        events.write_text("oom 1\noom_kill 0\n")  # an OOM without a kill: no event
        await asyncio.sleep(0.05)
        assert watcher.queue().empty()
        events.write_text("oom 2\noom_kill 1\n")
        got = [await asyncio.wait_for(watcher.next_event(), 2)]
        watcher.unwatch(watch)
        events.write_text("oom 3\noom_kill 2\n")  # after unwatch: nothing more
        await asyncio.sleep(0.05)
        got.append(str(watcher.queue().qsize()))
        watcher.close()
        return got

    assert asyncio.run(scenario()) == ["ctr-1", "0"]


def test_oom_watcher_without_loop_does_not_watch(tmp_path):
    assert oom.OomWatcher().watch(str(tmp_path), 2, "x") is None


def test_parse_net_dev_skips_lo():
    from agent.rpc.resources import parse_net_dev

    text = ("Inter-|   Receive                            |  Transmit\n"
            " face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop"
            " fifo colls carrier compressed\n"
            "    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n"
            "  eth0: 1500 10 1 2 0 0 0 0 900 7 3 4 0 0 0 0\n")
    [eth0] = parse_net_dev(text)
    assert (eth0.name, eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_dropped) == (
        "eth0", 1500, 10, 1, 2)
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_dropped) == (900, 7, 3, 4)


def _v2_manager(root, controllers: str):
    from agent.runtime.cgroups import Manager
    from agent.runtime.cgroups.layout import Layout

    fake(root, cgroup__controllers=controllers, cgroup__subtree_control="")
    return Manager(Layout({}, str(root), frozenset(controllers.split())))


def _recording(monkeypatch) -> list[tuple[str, str]]:
    written: list[tuple[str, str]] = []
    real, real_writer = files.write, files.Writer.write

    def write(path, value):
        written.append((os.path.basename(path), value))
        real(path, value)

    def writer_write(self, path, value):
        written.append((os.path.basename(path), value))
        real_writer(self, path, value)

    monkeypatch.setattr(files, "write", write)
    monkeypatch.setattr(files.Writer, "write", writer_write)
    return written


def test_v2_create_enables_controllers_and_undoes_them_on_failure(tmp_path, monkeypatch):
    """Pure v2: controllers are enabled in the parent; a failure removes the new directory and
    disables what was enabled in the pre-existing parent."""
    m = _v2_manager(tmp_path, "memory pids")
    written = _recording(monkeypatch)
    res = oci_pb2.LinuxResources()
    res.Pids.Limit = 5
    with pytest.raises(InvalidArgument, match=r"Pids\.Limit: not supported by this kernel"):
        m.create("/c1", res, owner="o")  # a plain directory has no pids.max
    assert written == [("cgroup.subtree_control", "+memory"), ("cgroup.subtree_control", "+pids"),
                       ("cgroup.subtree_control", "-pids"), ("cgroup.subtree_control", "-memory")]
    assert not (tmp_path / "c1").exists() and not m.owned


def test_v2_required_controller_missing_is_refused_before_any_directory(tmp_path):
    from agent.errors import FailedPrecondition
    from agent.runtime.cgroups.manager import Cgroup

    m = _v2_manager(tmp_path, "pids")
    res = oci_pb2.LinuxResources()
    res.Memory.Limit = 1 << 20
    with pytest.raises(InvalidArgument, match=r"^OCI\.Linux\.Resources\.Memory: the memory cgroup"):
        m.create("a/b", res, owner="o")
    assert not (tmp_path / "a").exists()
    # Available at the root but not below it (a parent that did not delegate it).
    (tmp_path / "mid").mkdir()
    fake(tmp_path / "mid", cgroup__controllers="pids", cgroup__subtree_control="")
    with pytest.raises(FailedPrecondition, match=r"^OCI\.Linux\.CgroupsPath: the memory controller "
                                                 r"is not available in .*/mid$"):
        m._enable(Cgroup(m, "mid/x", "o"), str(tmp_path / "mid"), {"memory"}, set())
