"""Pure parts of agent.runtime.cgroups: paths, layout, value conversions, plans (no root)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import linux
from agent.errors import InvalidArgument
from agent.protocols import oci_pb2
from agent.runtime.cgroups import cgpath, layout, plan
from agent.runtime.cgroups.plan import make_plan


def v1(_ctrl: str) -> int:
    return 1


def v2(_ctrl: str) -> int:
    return 2


def writes(p: plan.Plan) -> list[tuple[str, str, str]]:
    return [(w.controller, w.file, w.value) for w in p.writes]


# ---- CgroupsPath ----

@pytest.mark.parametrize("given_path, expected", [
    ("/kubepods/pod1/c1", "kubepods/pod1/c1"),
    ("a//b/", "a/b"),
    ("relative/x", "relative/x"),
    ("", "kata_agent/owner1"),
    ("system.slice:kata_agent:abc", "system.slice/kata_agent-abc.scope"),
    ("machine-kata-pod.slice:cri:c1", "machine.slice/machine-kata.slice/machine-kata-pod.slice/cri-c1.scope"),
    (":kata:abc", "system.slice/kata-abc.scope"),
    ("-.slice::abc", "abc.scope"),
    ("user.slice:p:sub.slice", "user.slice/sub.slice"),
])
def test_resolve_forms(given_path, expected):
    assert cgpath.resolve(given_path, "owner1") == expected


@pytest.mark.parametrize("bad", ["/", "//", "/a/../b", "..", "a/./b", "x\0y", "a-.slice:p:n"])
def test_resolve_rejects(bad):
    with pytest.raises(InvalidArgument, match=r"^OCI\.Linux\.CgroupsPath: "):
        cgpath.resolve(bad, "o")


def test_colon_path_that_is_not_systemd_is_a_plain_path():
    assert cgpath.resolve("/a:b:c", "o") == "a:b:c"
    assert cgpath.resolve("notaslice:p:n", "o") == "notaslice:p:n"


# ---- layout ----

MOUNTINFO_HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 31 0:39 / /mnt/with\\040space rw - cgroup cgroup rw,pids
"""


def test_hierarchies_hybrid():
    v1map, v2root, dynmods = layout.hierarchies(linux.parse_mountinfo(MOUNTINFO_HYBRID))
    assert v2root == "/sys/fs/cgroup/unified" and not dynmods
    assert v1map == {"cpu": "/sys/fs/cgroup/cpu", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                     "memory": "/sys/fs/cgroup/memory", "pids": "/mnt/with space"}


def test_hierarchies_v2_favordynmods():
    text = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n"
    assert layout.hierarchies(linux.parse_mountinfo(text)) == ({}, "/sys/fs/cgroup", True)


def test_routes_hybrid_and_pure_v2():
    hybrid = layout.Layout({"memory": "/m", "cpu": "/c", "cpuacct": "/c"}, "/u",
                           frozenset({"hugetlb", "io"}))
    assert hybrid.mode == "hybrid"
    assert hybrid.route("memory") == layout.Route(1, "/m")
    assert hybrid.route("hugetlb") == layout.Route(2, "/u")
    assert hybrid.route("blkio") == layout.Route(2, "/u")
    assert hybrid.route("freezer") == layout.Route(2, "/u")  # core on v2
    assert hybrid.route("pids") is None
    assert hybrid.route("devices") == layout.Route(2, "/u")  # an eBPF filter on v2
    assert hybrid.roots() == ["/c", "/m", "/u"]  # co-mounted cpu+cpuacct once
    pure = layout.Layout({}, "/sys/fs/cgroup", frozenset({"memory"}))
    assert pure.mode == "v2" and pure.roots() == ["/sys/fs/cgroup"]
    assert layout.Layout().mode == "none"


# ---- conversions ----

@pytest.mark.parametrize("shares, weight", [(2, 1), (1024, 39), (262144, 10000), (1, 1), (10**6, 10000)])
def test_shares_to_weight(shares, weight):
    assert plan.shares_to_weight(shares) == weight


@given(st.integers(2, 262143))
def test_shares_to_weight_is_monotonic_and_in_range(shares):
    a, b = plan.shares_to_weight(shares), plan.shares_to_weight(shares + 1)
    assert 1 <= a <= b <= 10000


@pytest.mark.parametrize("weight, io", [(10, 1), (1000, 10000), (500, 4950)])
def test_blkio_to_io_weight(weight, io):
    assert plan.blkio_to_io_weight(weight) == io


@pytest.mark.parametrize("swap, limit, expected", [
    (0, 0, None), (0, 100, None), (-1, 100, "max"), (0, -1, "max"), (150, 100, "50"),
    (100, 100, "0"), (-1, -1, "max"),
])
def test_swap_max_v2(swap, limit, expected):
    assert plan.swap_max_v2(swap, limit) == expected


@pytest.mark.parametrize("swap, limit", [(100, 0), (100, -1), (50, 100)])
def test_swap_max_v2_rejects(swap, limit):
    with pytest.raises(ValueError):
        plan.swap_max_v2(swap, limit)


@pytest.mark.parametrize("quota, period, expected", [
    (0, 0, None), (50000, 100000, ("50000 100000", False)), (-1, 100000, ("max 100000", False)),
    (20000, 0, ("20000", False)), (-1, 0, ("max", False)), (0, 50000, ("50000", True)),
])
def test_cpu_max(quota, period, expected):
    assert plan.cpu_max(quota, period) == expected


@pytest.mark.parametrize("text, cpus", [("0", [0]), ("0-2,5", [0, 1, 2, 5]), ("3,1-2", [1, 2, 3]),
                                        ("7-7", [7])])
def test_parse_cpu_list(text, cpus):
    assert plan.parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["x", "", "1-", "-1", "1,,2", "3-1", "0 1", "1-2-3"])
def test_parse_cpu_list_rejects(text):
    with pytest.raises(ValueError):
        plan.parse_cpu_list(text)


# ---- plans ----

def resources(**groups) -> oci_pb2.LinuxResources:
    res = oci_pb2.LinuxResources()
    for name, values in groups.items():
        for key, value in values.items():
            setattr(getattr(res, name), key, value)
    return res


def test_memory_plan_v1_orders_limit_then_memsw_with_fallback():
    p = make_plan(resources(Memory={"Limit": 100, "Swap": 200, "Reservation": 50,
                                    "Swappiness": 10}), v1)
    assert writes(p) == [("memory", "memory.limit_in_bytes", "100"),
                         ("memory", "memory.memsw.limit_in_bytes", "200"),
                         ("memory", "memory.soft_limit_in_bytes", "50"),
                         ("memory", "memory.swappiness", "10")]
    assert p.writes[0].swap_on_einval and p.writes[1].optional


def test_memory_unlimited_sets_memsw_unlimited_too_on_v1():
    assert writes(make_plan(resources(Memory={"Limit": -1}), v1)) == [
        ("memory", "memory.limit_in_bytes", "-1"), ("memory", "memory.memsw.limit_in_bytes", "-1")]


def test_memory_plan_v2():
    p = make_plan(resources(Memory={"Limit": 100, "Swap": 300, "Reservation": -1,
                                    "Swappiness": 10, "Kernel": 5}), v2)
    assert writes(p) == [("memory", "memory.swap.max", "200"), ("memory", "memory.max", "100"),
                         ("memory", "memory.low", "max")]
    assert any("Swappiness" in n for n in p.notes) and any("Kernel" in n for n in p.notes)


def test_cpu_plan_v1_and_v2():
    res = resources(CPU={"Shares": 1024, "Quota": 50000, "Period": 100000, "Cpus": "0-1",
                         "Mems": "0"})
    assert writes(make_plan(res, v1)) == [
        ("cpu", "cpu.shares", "1024"), ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "50000"), ("cpuset", "cpuset.cpus", "0-1"),
        ("cpuset", "cpuset.mems", "0")]
    assert writes(make_plan(res, v2)) == [
        ("cpu", "cpu.weight", "39"), ("cpu", "cpu.max", "50000 100000"),
        ("cpuset", "cpuset.cpus", "0-1"), ("cpuset", "cpuset.mems", "0")]


def test_pids_blkio_hugetlb_plans():
    res = resources(Pids={"Limit": -1}, BlockIO={"Weight": 500})
    d = res.BlockIO.ThrottleReadBpsDevice.add(Major=8, Minor=0, Rate=1048576)
    assert d.Rate == 1048576
    res.HugepageLimits.add(Pagesize="2MB", Limit=4 << 21)
    assert writes(make_plan(res, v1)) == [
        ("pids", "pids.max", "max"), ("blkio", "blkio.weight", "500"),
        ("blkio", "blkio.throttle.read_bps_device", "8:0 1048576"),
        ("hugetlb", "hugetlb.2MB.limit_in_bytes", str(4 << 21))]
    p2 = make_plan(res, v2)
    assert writes(p2) == [
        ("pids", "pids.max", "max"), ("blkio", "io.bfq.weight", "500"),
        ("blkio", "io.max", "8:0 rbps=1048576"), ("hugetlb", "hugetlb.2MB.max", str(4 << 21))]
    assert p2.writes[1].targets[1] == ("io.weight", "4950")


def test_device_rules_v1_with_defaults_v2_as_filter_rules():
    res = oci_pb2.LinuxResources()
    res.Devices.add(Allow=False, Access="rwm")
    res.Devices.add(Allow=True, Type="c", Major=1, Minor=-1, Access="r")
    p = make_plan(res, v1)
    assert writes(p)[:3] == [("devices", "devices.deny", "a *:* rwm"),
                             ("devices", "devices.allow", "c 1:* r"),
                             ("devices", "devices.allow", "c *:* m")]
    assert len(p.writes) == 2 + len(plan.DEFAULT_DEVICE_RULES)
    p2 = make_plan(res, v2)
    assert p2.writes == []
    assert p2.device_rules == [(w.file, w.value) for w in p.writes]
    p0 = make_plan(res, lambda c: None)
    assert p0.writes == p0.device_rules == [] and any("Devices" in n for n in p0.notes)


@pytest.mark.parametrize("groups, field", [
    ({"CPU": {"Cpus": "x"}}, 'OCI.Linux.Resources.CPU.Cpus: invalid cpu list \'x\''),
    ({"CPU": {"Mems": "0-"}}, "OCI.Linux.Resources.CPU.Mems: invalid node list"),
    ({"CPU": {"Shares": 1}}, "OCI.Linux.Resources.CPU.Shares: 1 is outside"),
    ({"CPU": {"Quota": 999}}, "OCI.Linux.Resources.CPU.Quota"),
    ({"CPU": {"Period": 10}}, "OCI.Linux.Resources.CPU.Period"),
    ({"Memory": {"Limit": -2}}, "OCI.Linux.Resources.Memory.Limit: -2 is negative"),
    ({"Memory": {"Limit": 100, "Swap": 50}}, "OCI.Linux.Resources.Memory.Swap: 50 is below"),
    ({"Memory": {"Swappiness": 101}}, "OCI.Linux.Resources.Memory.Swappiness"),
    ({"BlockIO": {"Weight": 5}}, "OCI.Linux.Resources.BlockIO.Weight: 5 is outside"),
])
def test_invalid_values_name_the_field(groups, field):
    with pytest.raises(InvalidArgument) as info:
        make_plan(resources(**groups), v1)
    assert info.value.message.startswith(field)


def test_v2_only_refusals_and_update_prefix():
    with pytest.raises(InvalidArgument, match=r"^resources\.CPU\.RealtimeRuntime: "):
        make_plan(resources(CPU={"RealtimeRuntime": 1000}), v2, "resources")
    with pytest.raises(InvalidArgument, match=r"Memory\.Swap: a swap limit needs a memory limit"):
        make_plan(resources(Memory={"Swap": 100}), v2)


def test_bad_device_rule_and_pagesize():
    res = oci_pb2.LinuxResources()
    res.Devices.add(Allow=True, Type="x")
    with pytest.raises(InvalidArgument, match=r"^OCI\.Linux\.Resources\.Devices\[0\]\.Type"):
        make_plan(res, v1)
    res = oci_pb2.LinuxResources()
    res.HugepageLimits.add(Pagesize="2M", Limit=1)
    with pytest.raises(InvalidArgument, match=r"HugepageLimits\[0\]\.Pagesize: '2M'"):
        make_plan(res, v1)


def test_missing_controller_is_an_error_naming_the_group():
    with pytest.raises(InvalidArgument, match=r"^OCI\.Linux\.Resources\.Pids: the pids cgroup"):
        make_plan(resources(Pids={"Limit": 5}), lambda c: None if c == "pids" else 1)


def test_empty_and_network_only():
    assert make_plan(None, v1).writes == []
    p = make_plan(resources(Network={"ClassID": 7}), v1)
    assert p.writes == [] and any("Network" in n for n in p.notes)


@given(st.text(st.sampled_from("ab./:-_\n"), max_size=30))
def test_resolve_never_escapes_the_root(text):
    """Whatever the path, the result is a non-empty relative path with no '.' or '..' parts."""
    try:
        rel = cgpath.resolve(text, "owner")
    except InvalidArgument as exc:
        assert exc.message.startswith("OCI.Linux.CgroupsPath: ")
        return
    parts = rel.split("/")
    assert rel and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)
    assert "\n" not in rel


def test_device_filter_program_shape():
    from agent.runtime.cgroups import devices_bpf

    rules = [devices_bpf.parse_rule("devices.deny", "a *:* rwm"),
             devices_bpf.parse_rule("devices.allow", "c 1:* r"),
             devices_bpf.parse_rule("devices.allow", "b 8:0 rw")]
    assert rules[1] == devices_bpf.Rule(True, "c", 1, -1, "r")
    code = devices_bpf.program(rules)
    assert len(code) % 8 == 0
    # 7 set-up instructions, then per rule: type? + 3 access + major? + minor? + 2 returns.
    assert len(code) // 8 == 7 + (1 + 3 + 1 + 1 + 2) + (1 + 3 + 1 + 2) + (3 + 2) + 2
    assert code[-16:] == bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # deny
    allow_by_default = devices_bpf.program(rules[1:])
    assert allow_by_default[-16:-8] == bytes([0xB7, 0, 0, 0, 1, 0, 0, 0])


def test_name_systemd_is_joined_like_runc(tmp_path):
    text = ("30 25 0:26 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
            "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
            "32 25 0:28 / /sys/fs/cgroup/other rw - cgroup cgroup rw,name=other\n")
    (tmp_path / "mountinfo").write_text(text)
    lay = layout.detect_layout(str(tmp_path / "mountinfo"))
    assert lay.named == ("/sys/fs/cgroup/systemd",)  # name=other: not joined, as runc
    assert lay.roots() == ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/systemd"]
    assert lay.mode == "v1"
