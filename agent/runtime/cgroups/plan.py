"""LinuxResources -> the cgroup file writes that apply them, for v1 or v2. Pure: no file access.

Validation happens here, before anything is written, so bad input changes nothing. Every error
names the field: ``<prefix>.CPU.Cpus: invalid cpu list "x"``. A zero value means "unset" (proto3
scalars have no presence), as in Kata's agents.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import InvalidArgument
from agent.protocols import oci_pb2

UNLIMITED = -1
MAX_SHARES = 262144
MIN_SHARES = 2
MAX_WEIGHT_V2 = 10000
_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_PAGESIZE = re.compile(r"^[1-9]\d*(KB|MB|GB|TB)$")

# Devices every container may use whatever its rules say (as runc and Kata's agent allow them).
DEFAULT_DEVICE_RULES = (
    "c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
    "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:200 rwm",
)


@dataclass(frozen=True)
class Write:
    """One value for one cgroup file; the first of ``targets`` whose file exists is written."""

    controller: str  # logical controller whose directory holds the file
    targets: tuple[tuple[str, str], ...]  # (file name, value)
    field: str  # e.g. "Memory.Limit", joined to the caller's prefix
    optional: bool = False  # no target file exists -> skip with a log line instead of an error
    swap_on_einval: bool = False  # EINVAL -> write the next Write first, then retry this one
    keep_quota: bool = False  # v2 cpu.max with only a period: prefix the current quota
    busy: str = "busy"  # what EBUSY means for this file

    @property
    def file(self) -> str:
        return self.targets[0][0]

    @property
    def value(self) -> str:
        return self.targets[0][1]


@dataclass
class Plan:
    writes: list[Write] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was ignored, and why
    # cgroup v2: device rules as (devices.allow|devices.deny, rule), for an eBPF filter
    device_rules: list[tuple[str, str]] = field(default_factory=list)

    @property
    def controllers(self) -> set[str]:
        return {w.controller for w in self.writes}


# ---- conversions ---------------------------------------------------------------------------


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares [2, 262144] -> v2 cpu.weight [1, 10000] (linear, as runc maps it)."""
    shares = min(max(shares, MIN_SHARES), MAX_SHARES)
    return 1 + ((shares - MIN_SHARES) * (MAX_WEIGHT_V2 - 1)) // (MAX_SHARES - MIN_SHARES)


def blkio_to_io_weight(weight: int) -> int:
    """v1 blkio.weight [10, 1000] -> v2 io.weight [1, 10000]."""
    weight = min(max(weight, 10), 1000)
    return 1 + ((weight - 10) * (MAX_WEIGHT_V2 - 1)) // 990


def swap_max_v2(swap: int, limit: int) -> str | None:
    """OCI Swap is memory+swap (v1 memsw); v2 memory.swap.max is swap alone. None: unset."""
    if limit == UNLIMITED and swap == 0:
        return "max"  # unlimited memory with unset swap: unlimited swap too, as on v1
    if swap == 0:
        return None
    if swap == UNLIMITED:
        return "max"
    if limit <= 0:
        raise ValueError("a swap limit needs a memory limit")
    if swap < limit:
        raise ValueError("memory+swap must be at least the memory limit")
    return str(swap - limit)


def cpu_max(quota: int, period: int) -> tuple[str, bool] | None:
    """v2 cpu.max text and whether the current quota must be kept (a period alone)."""
    if quota == 0 and period == 0:
        return None
    if quota == 0:
        return str(period), True
    text = "max" if quota < 0 else str(quota)
    return (f"{text} {period}" if period else text), False


def parse_cpu_list(text: str) -> list[int]:
    """``0-2,5`` -> [0, 1, 2, 5]; ValueError for anything else."""
    if not _CPU_LIST.match(text):
        raise ValueError(f"invalid cpu list {text!r}")
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"invalid cpu list {text!r}: range {part} is reversed")
        out.extend(range(first, last + 1))
    return sorted(set(out))


def device_rule(dev: oci_pb2.LinuxDeviceCgroup, field: str) -> tuple[str, str]:
    """(devices.allow|devices.deny, "c 1:3 rwm") for one OCI device cgroup rule."""
    kind = dev.Type or "a"
    if kind not in ("a", "b", "c"):
        raise InvalidArgument(f"{field}.Type: {dev.Type!r} is not a, b or c")
    access = dev.Access or "rwm"
    if not set(access) <= set("rwm") or len(set(access)) != len(access):
        raise InvalidArgument(f"{field}.Access: {dev.Access!r} is not a combination of r, w, m")
    for name, num in (("Major", dev.Major), ("Minor", dev.Minor)):
        if num < -1:
            raise InvalidArgument(f"{field}.{name}: {num} is negative")
    major = "*" if dev.Major == -1 else str(dev.Major)
    minor = "*" if dev.Minor == -1 else str(dev.Minor)
    rule = f"a *:* {access}" if kind == "a" else f"{kind} {major}:{minor} {access}"
    return ("devices.allow" if dev.Allow else "devices.deny"), rule


# ---- per-group plans -----------------------------------------------------------------------


def _bad(prefix: str, field: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{prefix}.{field}: {why}")


def _check_memory(m: oci_pb2.LinuxMemory, prefix: str) -> None:
    for name in ("Limit", "Reservation", "Swap"):
        if getattr(m, name) < UNLIMITED:
            raise _bad(prefix, f"Memory.{name}", f"{getattr(m, name)} is negative")
    if m.Swap > 0 and m.Limit > 0 and m.Swap < m.Limit:
        raise _bad(prefix, "Memory.Swap", f"{m.Swap} is below Memory.Limit {m.Limit} "
                   "(Swap is the memory+swap limit)")
    if m.Swappiness > 100:
        raise _bad(prefix, "Memory.Swappiness", f"{m.Swappiness} is above 100")


def memory_v1(m: oci_pb2.LinuxMemory, prefix: str, plan: Plan) -> None:
    _check_memory(m, prefix)
    memsw = m.Swap if m.Swap else (UNLIMITED if m.Limit == UNLIMITED else 0)
    if m.Limit:
        plan.writes.append(Write("memory", (("memory.limit_in_bytes", str(m.Limit)),),
                                 "Memory.Limit", swap_on_einval=bool(memsw),
                                 busy="below the current usage"))
    if memsw:
        plan.writes.append(Write("memory", (("memory.memsw.limit_in_bytes", str(memsw)),),
                                 "Memory.Swap", optional=True, busy="below the current usage"))
    if m.Reservation:
        plan.writes.append(Write("memory", (("memory.soft_limit_in_bytes", str(m.Reservation)),),
                                 "Memory.Reservation"))
    if m.Swappiness:
        plan.writes.append(Write("memory", (("memory.swappiness", str(m.Swappiness)),),
                                 "Memory.Swappiness"))
    if m.DisableOOMKiller:
        plan.writes.append(Write("memory", (("memory.oom_control", "1"),),
                                 "Memory.DisableOOMKiller"))
    _kernel_notes(m, plan)


def memory_v2(m: oci_pb2.LinuxMemory, prefix: str, plan: Plan) -> None:
    _check_memory(m, prefix)
    try:
        swap = swap_max_v2(m.Swap, m.Limit)
    except ValueError as exc:
        raise _bad(prefix, "Memory.Swap", str(exc)) from None
    if swap is not None:
        plan.writes.append(Write("memory", (("memory.swap.max", swap),), "Memory.Swap",
                                 optional=True))
    if m.Limit:
        plan.writes.append(Write("memory", (("memory.max", _max(m.Limit)),), "Memory.Limit"))
    if m.Reservation:
        plan.writes.append(Write("memory", (("memory.low", _max(m.Reservation)),),
                                 "Memory.Reservation"))
    if m.Swappiness:
        plan.notes.append("Memory.Swappiness: no per-cgroup swappiness on cgroup v2; ignored")
    if m.DisableOOMKiller:
        plan.notes.append("Memory.DisableOOMKiller: not available on cgroup v2; ignored")
    _kernel_notes(m, plan)


def _kernel_notes(m: oci_pb2.LinuxMemory, plan: Plan) -> None:
    if m.Kernel or m.KernelTCP:
        plan.notes.append("Memory.Kernel/KernelTCP: kernel memory limits are deprecated; ignored")


def _max(value: int) -> str:
    return "max" if value < 0 else str(value)


def _check_cpu(c: oci_pb2.LinuxCPU, prefix: str) -> None:
    if c.Shares and not MIN_SHARES <= c.Shares <= MAX_SHARES:
        raise _bad(prefix, "CPU.Shares", f"{c.Shares} is outside [{MIN_SHARES}, {MAX_SHARES}]")
    if c.Quota < UNLIMITED or 0 < c.Quota < 1000:
        raise _bad(prefix, "CPU.Quota", f"{c.Quota} must be -1 or at least 1000 (microseconds)")
    if c.Period and not 1000 <= c.Period <= 1_000_000:
        raise _bad(prefix, "CPU.Period", f"{c.Period} is outside [1000, 1000000] (microseconds)")
    for name in ("Cpus", "Mems"):
        text = getattr(c, name)
        if text:
            try:
                parse_cpu_list(text)
            except ValueError as exc:
                what = str(exc).replace("cpu list", "cpu list" if name == "Cpus" else "node list")
                raise _bad(prefix, f"CPU.{name}", what) from None


def _cpuset(c: oci_pb2.LinuxCPU, plan: Plan) -> None:
    if c.Cpus:
        plan.writes.append(Write("cpuset", (("cpuset.cpus", c.Cpus),), "CPU.Cpus"))
    if c.Mems:
        plan.writes.append(Write("cpuset", (("cpuset.mems", c.Mems),), "CPU.Mems"))


def cpu_v1(c: oci_pb2.LinuxCPU, prefix: str, plan: Plan) -> None:
    _check_cpu(c, prefix)
    if c.RealtimeRuntime < UNLIMITED:
        raise _bad(prefix, "CPU.RealtimeRuntime", f"{c.RealtimeRuntime} is negative")
    if c.Shares:
        plan.writes.append(Write("cpu", (("cpu.shares", str(c.Shares)),), "CPU.Shares"))
    if c.Period:
        plan.writes.append(Write("cpu", (("cpu.cfs_period_us", str(c.Period)),), "CPU.Period",
                                 swap_on_einval=bool(c.Quota)))
    if c.Quota:
        plan.writes.append(Write("cpu", (("cpu.cfs_quota_us", str(c.Quota)),), "CPU.Quota"))
    if c.RealtimePeriod:
        plan.writes.append(Write("cpu", (("cpu.rt_period_us", str(c.RealtimePeriod)),),
                                 "CPU.RealtimePeriod", swap_on_einval=bool(c.RealtimeRuntime)))
    if c.RealtimeRuntime:
        plan.writes.append(Write("cpu", (("cpu.rt_runtime_us", str(c.RealtimeRuntime)),),
                                 "CPU.RealtimeRuntime"))
    _cpuset(c, plan)


def cpu_v2(c: oci_pb2.LinuxCPU, prefix: str, plan: Plan) -> None:
    _check_cpu(c, prefix)
    if c.RealtimeRuntime or c.RealtimePeriod:
        raise _bad(prefix, "CPU.RealtimeRuntime", "real-time scheduling limits are not "
                   "available on cgroup v2")
    if c.Shares:
        plan.writes.append(Write("cpu", (("cpu.weight", str(shares_to_weight(c.Shares))),),
                                 "CPU.Shares"))
    text = cpu_max(c.Quota, c.Period)
    if text is not None:
        plan.writes.append(Write("cpu", (("cpu.max", text[0]),), "CPU.Quota" if c.Quota
                                 else "CPU.Period", keep_quota=text[1]))
    _cpuset(c, plan)


def pids(p: oci_pb2.LinuxPids, prefix: str, plan: Plan) -> None:
    if p.Limit:
        plan.writes.append(Write("pids", (("pids.max", _max(p.Limit)),), "Pids.Limit"))


def _check_blkio(b: oci_pb2.LinuxBlockIO, prefix: str) -> None:
    for name, w in (("Weight", b.Weight), ("LeafWeight", b.LeafWeight)):
        if w and not 10 <= w <= 1000:
            raise _bad(prefix, f"BlockIO.{name}", f"{w} is outside [10, 1000]")
    for i, d in enumerate(b.WeightDevice):
        _check_dev(d, f"BlockIO.WeightDevice[{i}]", prefix)
        for name, w in (("Weight", d.Weight), ("LeafWeight", d.LeafWeight)):
            if w and not 10 <= w <= 1000:
                raise _bad(prefix, f"BlockIO.WeightDevice[{i}].{name}", f"{w} is outside [10, 1000]")
    for group in THROTTLES:
        for i, d in enumerate(getattr(b, group)):
            _check_dev(d, f"BlockIO.{group}[{i}]", prefix)


def _check_dev(d, field: str, prefix: str) -> None:
    if d.Major < 0 or d.Minor < 0:
        raise _bad(prefix, field, f"device {d.Major}:{d.Minor} has a negative number")


# OCI throttle list -> (v1 file, v2 io.max key)
THROTTLES = {
    "ThrottleReadBpsDevice": ("blkio.throttle.read_bps_device", "rbps"),
    "ThrottleWriteBpsDevice": ("blkio.throttle.write_bps_device", "wbps"),
    "ThrottleReadIOPSDevice": ("blkio.throttle.read_iops_device", "riops"),
    "ThrottleWriteIOPSDevice": ("blkio.throttle.write_iops_device", "wiops"),
}


def blkio_v1(b: oci_pb2.LinuxBlockIO, prefix: str, plan: Plan) -> None:
    _check_blkio(b, prefix)
    if b.Weight:
        plan.writes.append(Write("blkio", (("blkio.weight", str(b.Weight)),
                                           ("blkio.bfq.weight", str(b.Weight))),
                                 "BlockIO.Weight", optional=True))
    if b.LeafWeight:
        plan.writes.append(Write("blkio", (("blkio.leaf_weight", str(b.LeafWeight)),),
                                 "BlockIO.LeafWeight", optional=True))
    for i, d in enumerate(b.WeightDevice):
        dev = f"{d.Major}:{d.Minor}"
        if d.Weight:
            plan.writes.append(Write("blkio", (("blkio.weight_device", f"{dev} {d.Weight}"),
                                               ("blkio.bfq.weight_device", f"{dev} {d.Weight}")),
                                     f"BlockIO.WeightDevice[{i}].Weight", optional=True))
        if d.LeafWeight:
            plan.writes.append(Write("blkio", (("blkio.leaf_weight_device",
                                                f"{dev} {d.LeafWeight}"),),
                                     f"BlockIO.WeightDevice[{i}].LeafWeight", optional=True))
    for group, (v1file, _) in THROTTLES.items():
        for i, d in enumerate(getattr(b, group)):
            plan.writes.append(Write("blkio", ((v1file, f"{d.Major}:{d.Minor} {d.Rate}"),),
                                     f"BlockIO.{group}[{i}]"))


def blkio_v2(b: oci_pb2.LinuxBlockIO, prefix: str, plan: Plan) -> None:
    _check_blkio(b, prefix)
    if b.Weight:
        plan.writes.append(Write("blkio", (("io.bfq.weight", str(b.Weight)),
                                           ("io.weight", str(blkio_to_io_weight(b.Weight)))),
                                 "BlockIO.Weight", optional=True))
    if b.LeafWeight:
        plan.notes.append("BlockIO.LeafWeight: not available on cgroup v2; ignored")
    for i, d in enumerate(b.WeightDevice):
        dev = f"{d.Major}:{d.Minor}"
        if d.Weight:
            plan.writes.append(Write("blkio", (
                ("io.bfq.weight", f"{dev} {d.Weight}"),
                ("io.weight", f"{dev} {blkio_to_io_weight(d.Weight)}")),
                f"BlockIO.WeightDevice[{i}].Weight", optional=True))
    for group, (_, key) in THROTTLES.items():
        for i, d in enumerate(getattr(b, group)):
            rate = str(d.Rate) if d.Rate else "max"
            plan.writes.append(Write("blkio", (("io.max", f"{d.Major}:{d.Minor} {key}={rate}"),),
                                     f"BlockIO.{group}[{i}]"))


def hugetlb(limits, version: int, prefix: str, plan: Plan) -> None:
    for i, h in enumerate(limits):
        if not _PAGESIZE.match(h.Pagesize):
            raise _bad(prefix, f"HugepageLimits[{i}].Pagesize",
                       f"{h.Pagesize!r} is not a size like 2MB or 1GB")
        name = f"hugetlb.{h.Pagesize}.limit_in_bytes" if version == 1 else f"hugetlb.{h.Pagesize}.max"
        plan.writes.append(Write("hugetlb", ((name, str(h.Limit)),), f"HugepageLimits[{i}]",
                                 busy="below the current usage"))


def device_rules(rules, prefix: str) -> list[tuple[str, str]]:
    """The spec's rules, then the defaults every container may use."""
    parsed = [device_rule(d, f"{prefix}.Devices[{i}]") for i, d in enumerate(rules)]
    return parsed + [("devices.allow", r) for r in DEFAULT_DEVICE_RULES]


def devices_v1(rules, prefix: str, plan: Plan) -> None:
    parsed = device_rules(rules, prefix)
    for i, (file, rule) in enumerate(parsed):
        where = f"Devices[{i}]" if i < len(rules) else "Devices (defaults)"
        plan.writes.append(Write("devices", ((file, rule),), where))


# ---- the whole plan --------------------------------------------------------------------------

Version = Callable[[str], "int | None"]


def _unavailable(prefix: str, field: str, controller: str) -> InvalidArgument:
    return _bad(prefix, field, f"the {controller} cgroup controller is not available")


def make_plan(res: oci_pb2.LinuxResources | None, version: Version,
              prefix: str = "OCI.Linux.Resources") -> Plan:
    """The writes for ``res``; ``version(controller)`` is 1, 2 or None (not available)."""
    plan = Plan()
    if res is None:
        return plan
    groups = (
        ("Memory", "memory", memory_v1, memory_v2),
        ("CPU", "cpu", cpu_v1, cpu_v2),
        ("Pids", "pids", pids, pids),
        ("BlockIO", "blkio", blkio_v1, blkio_v2),
    )
    for name, controller, v1, v2 in groups:
        if not res.HasField(name):
            continue
        msg = getattr(res, name)
        if msg.ByteSize() == 0:
            continue
        ver = version(controller)
        if ver is None:
            raise _unavailable(prefix, name, controller)
        (v1 if ver == 1 else v2)(msg, prefix, plan)
    _cpuset_route(plan, version, prefix)
    if res.HugepageLimits:
        ver = version("hugetlb")
        if ver is None:
            raise _unavailable(prefix, "HugepageLimits", "hugetlb")
        hugetlb(res.HugepageLimits, ver, prefix, plan)
    if res.Devices:
        ver = version("devices")
        if ver == 1:
            devices_v1(res.Devices, prefix, plan)
        elif ver == 2:
            plan.device_rules = device_rules(res.Devices, prefix)
        else:
            plan.notes.append("Devices: no devices controller; rules not applied")
    if res.HasField("Network") and res.Network.ByteSize():
        plan.notes.append("Network: class id and priorities are not supported; ignored")
    return plan


def _cpuset_route(plan: Plan, version: Version, prefix: str) -> None:
    """CPU.Cpus/Mems belong to the cpuset controller, which may live elsewhere than cpu."""
    if any(w.controller == "cpuset" for w in plan.writes) and version("cpuset") is None:
        raise _unavailable(prefix, "CPU.Cpus", "cpuset")
