"""agent.metrics: RPC instruments, process and guest figures, in Prometheus text format."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import Metrics


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from an exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def write_proc(root) -> None:
    (root / "self").mkdir()
    (root / "net").mkdir()
    (root / "loadavg").write_text("0.50 0.25 0.10 1/100 4242\n")
    (root / "meminfo").write_text("MemTotal:  2048 kB\nMemFree:  1024 kB\nMemAvailable: 1536 kB\n"
                                  "HugePages_Total: 0\n")
    tick = os.sysconf("SC_CLK_TCK")
    (root / "stat").write_text(f"cpu  {3 * tick} 0 {tick} 0 0 0 0 0 0 0\n"
                               f"cpu0 {2 * tick} 0 {tick} 7 0 0 0 0 0 0\n"
                               f"cpu1 {tick} 0 0 9 0 0 0 0 0 0\nintr 1 2 3\n")
    (root / "diskstats").write_text(
        "   8       0 vda 10 0 80 5 4 0 16 3 0 9 8 0 0 0 0\n"
        "   7       0 loop0 1 0 8 0 0 0 0 0 0 0 0 0 0 0 0\n")
    (root / "net" / "dev").write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "  eth0:    1000      10    1    2    0     0          0         0     2000      20    3    4    0     0       0          0\n")
    (root / "self" / "status").write_text("Name:\tpython\nThreads:\t7\n")


def test_rpc_counts_and_latencies_by_method_and_code():
    m = Metrics()
    m.observe_rpc("ListRoutes", "OK", 0.002)
    m.observe_rpc("ListRoutes", "OK", 0.004)
    m.observe_rpc("ExecProcess", "PERMISSION_DENIED", 0.0001)
    s = samples(m.text())
    assert s[("kata_agent_rpc_requests_total", (("code", "OK"), ("method", "ListRoutes")))] == 2
    assert s[("kata_agent_rpc_requests_total",
              (("code", "PERMISSION_DENIED"), ("method", "ExecProcess")))] == 1
    assert s[("kata_agent_rpc_duration_seconds_count", (("method", "ListRoutes"),))] == 2
    assert abs(s[("kata_agent_rpc_duration_seconds_sum", (("method", "ListRoutes"),))] - 0.006) < 1e-9
    assert s[("kata_agent_rpc_duration_seconds_bucket", (("le", "0.0025"), ("method", "ListRoutes")))] == 1


def test_guest_figures_from_proc(tmp_path):
    write_proc(tmp_path)
    s = samples(Metrics(counts=lambda: (3, 5), uptime=lambda: 12.5, proc=str(tmp_path)).text())
    assert s[("kata_guest_load", (("period", "1m"),))] == 0.5
    assert s[("kata_guest_load", (("period", "15m"),))] == 0.1
    assert s[("kata_guest_memory_bytes", (("kind", "MemAvailable"),))] == 1536 * 1024
    assert ("kata_guest_memory_bytes", (("kind", "HugePages_Total"),)) not in s
    assert s[("kata_guest_cpu_seconds_total", (("cpu", "0"), ("mode", "user")))] == 2
    assert s[("kata_guest_cpu_seconds_total", (("cpu", "1"), ("mode", "idle")))] == 9 / os.sysconf("SC_CLK_TCK")
    assert s[("kata_guest_cpus_online", ())] == 2
    assert s[("kata_guest_disk_read_bytes_total", (("device", "vda"),))] == 80 * 512
    assert s[("kata_guest_disk_written_bytes_total", (("device", "vda"),))] == 16 * 512
    assert ("kata_guest_disk_read_bytes_total", (("device", "loop0"),)) not in s
    assert s[("kata_guest_network_receive_bytes_total", (("interface", "eth0"),))] == 1000
    assert s[("kata_guest_network_transmit_drops_total", (("interface", "eth0"),))] == 4
    assert s[("kata_agent_containers", ())] == 3
    assert s[("kata_agent_processes", ())] == 5
    assert s[("kata_agent_uptime_seconds", ())] == 12.5
    assert s[("kata_agent_threads", ())] == 7


def test_missing_proc_files_leave_their_metrics_out(tmp_path):
    (tmp_path / "loadavg").write_text("1.0 2.0 3.0 1/1 1\n")
    s = samples(Metrics(proc=str(tmp_path)).text())
    assert s[("kata_guest_load", (("period", "5m"),))] == 2.0
    assert not any(name.startswith("kata_guest_memory") for name, _ in s)


def test_process_metrics_of_this_process_and_no_global_registry():
    s = samples(Metrics().text())
    rss = s[("kata_agent_process_resident_memory_bytes", ())]
    assert rss > 1 << 20
    assert abs(s[("kata_agent_process_open_fds", ())] - len(os.listdir("/proc/self/fd"))) <= 2
    assert REGISTRY.get_sample_value("kata_agent_rpc_requests_total",
                                     {"method": "ListRoutes", "code": "OK"}) is None


class _HeldImport:
    """A meta path finder that holds the import of ``agent.exposition`` (the first scrape's)
    until released, and says when it began; it finds nothing itself."""

    def __init__(self) -> None:
        self.began = threading.Event()
        self.release = threading.Event()
        self.order: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "agent.exposition" and not self.began.is_set():
            self.order.append("import began")
            self.began.set()
            self.release.wait(30)  # a bound so that a loop it blocks cannot hang the test
            self.order.append("import done")
        return None


def test_a_health_check_is_served_while_the_first_scrape_imports(monkeypatch):
    """The first GetMetrics imports prometheus-client (0.35 s in a TCG guest): in a thread, so a
    Health call that comes meanwhile is answered before that import ends (it waited for it when
    the import ran on the event loop)."""
    from agent.config import Config
    from agent.context import Agent
    from agent.protocols import health_pb2
    from agent.service import Services
    from agent.wiring import all_handlers

    import agent

    monkeypatch.delitem(sys.modules, "agent.exposition", raising=False)  # as in a fresh agent
    monkeypatch.delattr(agent, "exposition", raising=False)
    held = _HeldImport()
    monkeypatch.setattr(sys, "meta_path", [held, *sys.meta_path])

    async def scenario() -> tuple[bytes, bytes]:
        services = Services(Agent(config=Config(), metrics=Metrics()), all_handlers())
        scrape = asyncio.ensure_future(services.dispatch("grpc.AgentService", "GetMetrics", b""))
        while not held.began.is_set():
            assert not scrape.done(), "GetMetrics did not import agent.exposition"
            await asyncio.sleep(0.001)
        health = await services.dispatch("grpc.Health", "Check", b"")
        held.order.append("health answered")
        held.release.set()
        return health, await scrape

    health, metrics = asyncio.run(scenario())
    assert held.order == ["import began", "health answered", "import done"]
    assert health_pb2.HealthCheckResponse.FromString(health).status == health_pb2.HealthCheckResponse.SERVING
    from agent.protocols import agent_pb2

    text = agent_pb2.Metrics.FromString(metrics).metrics
    assert "# TYPE kata_agent_rpc_requests_total counter" in text
