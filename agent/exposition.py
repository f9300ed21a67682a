"""The Prometheus side of GetMetrics, imported on the first scrape (agent.metrics keeps the counts).

One CollectorRegistry per agent, never prometheus-client's global one: the RPC counts and
latencies agent.metrics recorded, the agent process (RSS, CPU, fds, threads), its containers and
processes, and the guest's load, memory, CPU time, disk and network counters, read from /proc at
each scrape.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from agent.metrics import AGENT, GUEST, RPC_BUCKETS, Metrics

# Fields of /proc/stat's cpu line, in order (man proc).
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
MEMINFO_KEYS = ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapTotal", "SwapFree",
                "Shmem", "Dirty")
NET_FIELDS = {0: "receive_bytes", 1: "receive_packets", 2: "receive_errors", 3: "receive_drops",
              8: "transmit_bytes", 9: "transmit_packets", 10: "transmit_errors", 11: "transmit_drops"}
SECTOR = 512
BUCKET_LABELS = tuple(floatToGoString(b) for b in (*RPC_BUCKETS, math.inf))


def registry(metrics: Metrics) -> CollectorRegistry:
    reg = CollectorRegistry()  # no describe pass: it would read every /proc file once more
    reg.register(RpcCollector(metrics))
    ProcessCollector(namespace=AGENT, proc=metrics.proc, registry=reg)
    reg.register(AgentCollector(metrics.counts, metrics.uptime, Path(metrics.proc)))
    reg.register(GuestCollector(Path(metrics.proc)))
    return reg


def render(reg: CollectorRegistry) -> str:
    return generate_latest(reg).decode()


class RpcCollector:
    """RPCs served, by method and status code, and their latencies by method."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(f"{AGENT}_rpc_requests", "RPCs served, by method and status code.",
                                       labels=["method", "code"])
        for (method, code), n in sorted(self.metrics.requests.items()):
            requests.add_metric([method, code], n)
        yield requests
        seconds = HistogramMetricFamily(f"{AGENT}_rpc_duration_seconds", "RPC latency by method.",
                                        labels=["method"])
        for method, (counts, total) in sorted(self.metrics.durations.items()):
            cumulative, buckets = 0, []
            for le, n in zip(BUCKET_LABELS, counts):
                cumulative += n
                buckets.append((le, cumulative))
            seconds.add_metric([method], buckets, sum_value=total[0])
        yield seconds


class AgentCollector:
    """The agent's state at scrape time: threads, containers and their processes, uptime."""

    def __init__(self, counts: Callable[[], tuple[int, int]], uptime: Callable[[], float],
                 proc: Path) -> None:
        self.counts = counts
        self.uptime = uptime
        self.proc = proc

    def collect(self) -> Iterator[Metric]:
        containers, processes = self.counts()
        yield GaugeMetricFamily(f"{AGENT}_containers", "Containers the agent manages.", containers)
        yield GaugeMetricFamily(f"{AGENT}_processes", "Container processes the agent manages.", processes)
        yield GaugeMetricFamily(f"{AGENT}_uptime_seconds", "Seconds since the agent started.", self.uptime())
        threads = _status_value(self.proc / "self" / "status", "Threads")
        if threads is not None:
            yield GaugeMetricFamily(f"{AGENT}_threads", "Threads of the agent process.", threads)


class GuestCollector:
    """The guest's load, memory, CPU, disk and network counters from /proc."""

    def __init__(self, proc: Path) -> None:
        self.proc = proc

    def collect(self) -> Iterator[Metric]:
        for reader in (self._load, self._memory, self._cpu, self._disks, self._network):
            try:
                yield from reader()
            except (OSError, ValueError, IndexError):
                continue  # a /proc file this kernel lacks: leave its metrics out

    def _load(self) -> Iterator[Metric]:
        fields = (self.proc / "loadavg").read_text().split()
        g = GaugeMetricFamily(f"{GUEST}_load", "Load average.", labels=["period"])
        for period, value in zip(("1m", "5m", "15m"), fields[:3]):
            g.add_metric([period], float(value))
        yield g

    def _memory(self) -> Iterator[Metric]:
        info = _meminfo(self.proc / "meminfo")
        g = GaugeMetricFamily(f"{GUEST}_memory_bytes", "Memory from /proc/meminfo.", labels=["kind"])
        for key in MEMINFO_KEYS:
            if key in info:
                g.add_metric([key], info[key])
        yield g

    def _cpu(self) -> Iterator[Metric]:
        c = CounterMetricFamily(f"{GUEST}_cpu_seconds", "CPU time by cpu and mode.", labels=["cpu", "mode"])
        tick = os.sysconf("SC_CLK_TCK")
        online = 0
        for line in (self.proc / "stat").read_text().splitlines():
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            online += 1
            for mode, value in zip(CPU_MODES, values):
                c.add_metric([name[3:], mode], int(value) / tick)
        yield c
        yield GaugeMetricFamily(f"{GUEST}_cpus_online", "CPUs online.", online)

    def _disks(self) -> Iterator[Metric]:
        read = CounterMetricFamily(f"{GUEST}_disk_read_bytes", "Bytes read by device.", labels=["device"])
        written = CounterMetricFamily(f"{GUEST}_disk_written_bytes", "Bytes written by device.",
                                      labels=["device"])
        for line in (self.proc / "diskstats").read_text().splitlines():
            f = line.split()
            if len(f) < 10 or f[2].startswith(("loop", "ram")):
                continue
            read.add_metric([f[2]], int(f[5]) * SECTOR)
            written.add_metric([f[2]], int(f[9]) * SECTOR)
        yield read
        yield written

    def _network(self) -> Iterator[Metric]:
        families = {name: CounterMetricFamily(f"{GUEST}_network_{name}", f"Network {name.replace('_', ' ')}.",
                                              labels=["interface"]) for name in NET_FIELDS.values()}
        for line in (self.proc / "net" / "dev").read_text().splitlines()[2:]:
            iface, _, rest = line.partition(":")
            values = rest.split()
            for index, name in NET_FIELDS.items():
                families[name].add_metric([iface.strip()], int(values[index]))
        yield from families.values()


def _meminfo(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _status_value(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None
