"""CgroupStats from v1 or v2 files. Missing files read as zero: a stat a kernel lacks is not an error."""

from __future__ import annotations

import os
from collections.abc import Callable

from agent.protocols import agent_pb2
from agent.runtime.cgroups import files
from agent.runtime.cgroups.files import U64_MAX

# (directory, version) for a logical controller, or None when not served.
Where = Callable[[str], "tuple[str, int] | None"]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_NS_PER_TICK = 1_000_000_000 // _CLK_TCK


def _j(d: str, name: str) -> str:
    return os.path.join(d, name)


def cpu(where: Where) -> agent_pb2.CpuStats:
    out = agent_pb2.CpuStats()
    acct = where("cpuacct")
    if acct and acct[1] == 1:
        d = acct[0]
        out.cpu_usage.total_usage = files.read_int(_j(d, "cpuacct.usage"))
        per = files.read_opt(_j(d, "cpuacct.usage_percpu")) or ""
        out.cpu_usage.percpu_usage.extend(int(x) for x in per.split())
        st = files.read_kv(_j(d, "cpuacct.stat"))
        out.cpu_usage.usage_in_usermode = st.get("user", 0) * _NS_PER_TICK
        out.cpu_usage.usage_in_kernelmode = st.get("system", 0) * _NS_PER_TICK
    elif acct:
        st = files.read_kv(_j(acct[0], "cpu.stat"))
        out.cpu_usage.total_usage = st.get("usage_usec", 0) * 1000
        out.cpu_usage.usage_in_usermode = st.get("user_usec", 0) * 1000
        out.cpu_usage.usage_in_kernelmode = st.get("system_usec", 0) * 1000
    cpu_where = where("cpu")
    if cpu_where:
        st = files.read_kv(_j(cpu_where[0], "cpu.stat"))
        throttled = (st.get("throttled_time", 0) if cpu_where[1] == 1
                     else st.get("throttled_usec", 0) * 1000)
        out.throttling_data.periods = st.get("nr_periods", 0)
        out.throttling_data.throttled_periods = st.get("nr_throttled", 0)
        out.throttling_data.throttled_time = throttled
    return out


def _mem_v1(d: str, prefix: str) -> agent_pb2.MemoryData:
    return agent_pb2.MemoryData(
        usage=files.read_int(_j(d, f"{prefix}.usage_in_bytes")),
        max_usage=files.read_int(_j(d, f"{prefix}.max_usage_in_bytes")),
        failcnt=files.read_int(_j(d, f"{prefix}.failcnt")),
        limit=files.read_int(_j(d, f"{prefix}.limit_in_bytes"), U64_MAX))


def memory(where: Where) -> agent_pb2.MemoryStats:
    w = where("memory")
    if w is None:
        return agent_pb2.MemoryStats()
    d, version = w
    stat = files.read_kv(_j(d, "memory.stat"))
    if version == 1:
        return agent_pb2.MemoryStats(
            cache=stat.get("cache", 0), usage=_mem_v1(d, "memory"),
            swap_usage=_mem_v1(d, "memory.memsw"), kernel_usage=_mem_v1(d, "memory.kmem"),
            use_hierarchy=files.read_int(_j(d, "memory.use_hierarchy")) == 1, stats=stat)
    events = files.read_kv(_j(d, "memory.events"))
    usage = agent_pb2.MemoryData(
        usage=files.read_int(_j(d, "memory.current")),
        max_usage=files.read_int(_j(d, "memory.peak")),
        failcnt=events.get("max", 0),
        limit=files.read_int(_j(d, "memory.max"), U64_MAX))
    swap = agent_pb2.MemoryData(
        usage=files.read_int(_j(d, "memory.swap.current")),
        max_usage=files.read_int(_j(d, "memory.swap.peak")),
        failcnt=files.read_kv(_j(d, "memory.swap.events")).get("max", 0),
        limit=files.read_int(_j(d, "memory.swap.max"), U64_MAX))
    kernel = agent_pb2.MemoryData(usage=stat.get("kernel", stat.get("kernel_stack", 0)))
    return agent_pb2.MemoryStats(cache=stat.get("file", 0), usage=usage, swap_usage=swap,
                                 kernel_usage=kernel, use_hierarchy=True, stats=stat)


def pids(where: Where) -> agent_pb2.PidsStats:
    w = where("pids")
    if w is None:
        return agent_pb2.PidsStats()
    limit = files.read_int(_j(w[0], "pids.max"), U64_MAX)
    return agent_pb2.PidsStats(current=files.read_int(_j(w[0], "pids.current")),
                               limit=0 if limit == U64_MAX else limit)


def parse_blkio_v1(text: str) -> list[agent_pb2.BlkioStatsEntry]:
    """``8:0 Read 4096`` lines (the ``Total`` line is skipped)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or ":" not in parts[0]:
            continue
        major, _, minor = parts[0].partition(":")
        out.append(agent_pb2.BlkioStatsEntry(major=int(major), minor=int(minor), op=parts[1],
                                             value=int(parts[2])))
    return out


_V2_IO = {"rbytes": ("bytes", "Read"), "wbytes": ("bytes", "Write"), "dbytes": ("bytes", "Discard"),
          "rios": ("ios", "Read"), "wios": ("ios", "Write"), "dios": ("ios", "Discard")}


def parse_io_stat(text: str) -> tuple[list, list]:
    """v2 io.stat -> (service bytes entries, serviced entries)."""
    service_bytes, serviced = [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        major, _, minor = parts[0].partition(":")
        for kv in parts[1:]:
            key, _, value = kv.partition("=")
            if key in _V2_IO:
                kind, op = _V2_IO[key]
                entry = agent_pb2.BlkioStatsEntry(major=int(major), minor=int(minor), op=op,
                                                  value=int(value))
                (service_bytes if kind == "bytes" else serviced).append(entry)
    return service_bytes, serviced


_V1_BLKIO = {
    "io_service_bytes_recursive": ("blkio.io_service_bytes_recursive",
                                   "blkio.throttle.io_service_bytes_recursive"),
    "io_serviced_recursive": ("blkio.io_serviced_recursive", "blkio.throttle.io_serviced_recursive"),
    "io_queued_recursive": ("blkio.io_queued_recursive",),
    "io_service_time_recursive": ("blkio.io_service_time_recursive",),
    "io_wait_time_recursive": ("blkio.io_wait_time_recursive",),
    "io_merged_recursive": ("blkio.io_merged_recursive",),
    "io_time_recursive": ("blkio.time_recursive",),
    "sectors_recursive": ("blkio.sectors_recursive",),
}


def blkio(where: Where) -> agent_pb2.BlkioStats:
    out = agent_pb2.BlkioStats()
    w = where("blkio")
    if w is None:
        return out
    if w[1] == 2:
        service_bytes, serviced = parse_io_stat(files.read_opt(_j(w[0], "io.stat")) or "")
        out.io_service_bytes_recursive.extend(service_bytes)
        out.io_serviced_recursive.extend(serviced)
        return out
    for field, names in _V1_BLKIO.items():
        for name in names:
            text = files.read_opt(_j(w[0], name))
            if text:
                getattr(out, field).extend(parse_blkio_v1(text))
                break
    return out


def hugetlb(where: Where, sizes: list[str]) -> dict[str, agent_pb2.HugetlbStats]:
    w = where("hugetlb")
    out: dict[str, agent_pb2.HugetlbStats] = {}
    if w is None:
        return out
    d, version = w
    for size in sizes:
        if version == 1:
            if not os.path.exists(_j(d, f"hugetlb.{size}.usage_in_bytes")):
                continue
            out[size] = agent_pb2.HugetlbStats(
                usage=files.read_int(_j(d, f"hugetlb.{size}.usage_in_bytes")),
                max_usage=files.read_int(_j(d, f"hugetlb.{size}.max_usage_in_bytes")),
                failcnt=files.read_int(_j(d, f"hugetlb.{size}.failcnt")))
        elif os.path.exists(_j(d, f"hugetlb.{size}.current")):
            out[size] = agent_pb2.HugetlbStats(
                usage=files.read_int(_j(d, f"hugetlb.{size}.current")),
                failcnt=files.read_kv(_j(d, f"hugetlb.{size}.events")).get("max", 0))
    return out


def hugepage_sizes(sysfs: str = "/sys/kernel/mm/hugepages") -> list[str]:
    """``hugepages-2048kB`` -> ``2MB``, as cgroup file names spell them."""
    sizes = []
    try:
        names = os.listdir(sysfs)
    except OSError:
        return sizes
    for name in sorted(names):
        kb = name.removeprefix("hugepages-").removesuffix("kB")
        if kb.isdigit():
            sizes.append(size_name(int(kb) * 1024))
    return sizes


def size_name(nbytes: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def collect(where: Where, sizes: list[str]) -> agent_pb2.CgroupStats:
    out = agent_pb2.CgroupStats(cpu_stats=cpu(where), memory_stats=memory(where),
                                pids_stats=pids(where), blkio_stats=blkio(where))
    for size, st in hugetlb(where, sizes).items():
        out.hugetlb_stats[size].CopyFrom(st)
    return out
