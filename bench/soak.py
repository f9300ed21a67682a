"""Soak: container lifecycles in sequence, then concurrently, under parallel client load.

    .venv/bin/python bench/soak.py                      # 1000 sequential, 100 concurrent, 50 clients
    .venv/bin/python bench/soak.py --sequential 50 --concurrent 10 --clients 10 --json out.json
    .venv/bin/python bench/soak.py --proto grpc          # every client on gRPC (default ttrpc)

The agent runs confined (tests/reliability/isolated.py). One lifecycle is CreateContainer,
StartContainer, WaitProcess, ReadStdout, RemoveContainer of ``echo``. While the lifecycles run,
``--clients`` connections loop over Health.Check, StatsContainer and ExecProcess+WaitProcess on a
long-running container. Reported: throughput and p50/p99 latencies; the agent's RSS, fds,
threads, mounts, children and cgroups at start and end (after a warm-up lifecycle, and after the
load has stopped and the long-running container is removed).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import pathlib
import random
import statistics
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "host-client"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import grpc  # noqa: E402

from agent.protocols import agent_pb2, oci_pb2  # noqa: E402
from kata_agent_client import AgentClient  # noqa: E402
from tests.support import make_busybox_rootfs  # noqa: E402
from tests.reliability.containers import create, read_all, spec  # noqa: E402
from tests.reliability.invariants import AgentState, settle  # noqa: E402
from tests.reliability.isolated import IsolatedAgent  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
            "max_ms": round(max(ms), 2) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None}


def lifecycle(client: AgentClient, rootfs, cid: str) -> float:
    start = time.perf_counter()
    create(client, cid, spec(rootfs, ["echo", cid]))
    client.call("StartContainer", {"container_id": cid})
    status = client.call("WaitProcess", {"container_id": cid}).status
    out = read_all(client, cid)
    client.call("RemoveContainer", {"container_id": cid})
    if status != 0 or out != f"{cid}\n".encode():
        raise AssertionError(f"{cid}: status {status}, output {out!r}")
    return (time.perf_counter() - start) * 1000


class Load:
    """``clients`` connections issuing health, stats and exec calls until stopped."""

    def __init__(self, addr: str, cid: str, clients: int, pause: float,
                 kinds: tuple[str, ...] = ("health", "health", "stats", "stats", "exec"), proto: str = "ttrpc") -> None:
        self.addr, self.cid, self.pause, self.kinds, self.proto = addr, cid, pause, kinds, proto
        self.stop = threading.Event()
        self.lat: dict[str, list[float]] = {"health": [], "stats": [], "exec": []}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]
        self.seq = 0

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _next_exec(self) -> str:
        with self.lock:
            self.seq += 1
            return f"x{self.seq}"

    def _loop(self, i: int) -> None:
        rng = random.Random(i)
        with AgentClient(self.addr, timeout=60, proto=self.proto) as c:
            while not self.stop.is_set():
                kind = rng.choice(self.kinds)
                start = time.perf_counter()
                try:
                    if kind == "health":
                        assert c.health() == "SERVING"
                    elif kind == "stats":
                        c.call("StatsContainer", {"container_id": self.cid})
                    else:
                        eid = self._next_exec()
                        c.call("ExecProcess", agent_pb2.ExecProcessRequest(
                            container_id=self.cid, exec_id=eid,
                            process=oci_pb2.Process(Args=["true"], Cwd="/")))
                        assert c.call("WaitProcess", {"container_id": self.cid, "exec_id": eid}).status == 0
                except (grpc.RpcError, AssertionError) as exc:
                    with self.lock:
                        self.errors.append(f"{kind}: {getattr(exc, 'details', lambda: exc)()}")
                    continue
                ms = (time.perf_counter() - start) * 1000
                with self.lock:
                    self.lat[kind].append(ms)
                self.stop.wait(self.pause)


def run_soak(sequential: int = 1000, concurrent: int = 100, clients: int = 50, pause: float = 0.02,
             workdir: pathlib.Path | None = None, log=print,
             kinds: tuple[str, ...] = ("health", "health", "stats", "stats", "exec"), proto: str = "ttrpc") -> dict:
    work = pathlib.Path(workdir or tempfile.mkdtemp(prefix="soak-"))
    agent = IsolatedAgent(work / "agent")
    client = None
    try:
        rootfs = make_busybox_rootfs(agent.work / "rootfs")
        client = AgentClient(agent.addr, timeout=60, proto=proto)
        lifecycle(client, rootfs, "warm-up")
        start_state = AgentState.take(agent.pid)
        start_cgroups = agent.cgroups()

        load_cid = "load"
        create(client, load_cid, spec(rootfs, ["sleep", "100000"]))
        client.call("StartContainer", {"container_id": load_cid})
        load = Load(agent.addr, load_cid, clients, pause, kinds, proto)
        load.start()

        t0 = time.perf_counter()
        seq_ms = [lifecycle(client, rootfs, f"s{i}") for i in range(sequential)]
        seq_s = time.perf_counter() - t0
        log(f"sequential: {sequential} in {seq_s:.1f} s")

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrent) as pool:
            conc_ms = list(pool.map(lambda i: lifecycle(client, rootfs, f"c{i}"), range(concurrent)))
        conc_s = time.perf_counter() - t0
        log(f"concurrent: {concurrent} in {conc_s:.1f} s")

        load.finish()
        mid_state = AgentState.take(agent.pid)
        client.call("RemoveContainer", {"container_id": load_cid, "timeout": 10})
        problems = settle(agent.pid, start_state, timeout=15)
        end_state = AgentState.take(agent.pid)
        left_cgroups = sorted(agent.cgroups() - start_cgroups)
        result = {
            "proto": proto,
            "sequential": {"lifecycles": sequential, "seconds": round(seq_s, 2),
                           "per_second": round(sequential / seq_s, 1) if seq_s else None, **summary(seq_ms)},
            "concurrent": {"lifecycles": concurrent, "seconds": round(conc_s, 2),
                           "per_second": round(concurrent / conc_s, 1) if conc_s else None, **summary(conc_ms)},
            "load": {"clients": clients, **{k: summary(v) for k, v in load.lat.items()},
                     "errors": len(load.errors), "first_errors": load.errors[:5]},
            "agent": {"start": start_state.figures(), "under_load": mid_state.figures(),
                      "end": end_state.figures()},
            "leaks": problems + [f"cgroup {c}" for c in left_cgroups],
            "rss_growth_mb": round((end_state.rss_kb - start_state.rss_kb) / 1024, 1),
        }
        return result
    finally:
        if client is not None:
            client.close()
        rc = agent.stop()
        if rc != 0:
            log(f"agent exited with {rc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequential", type=int, default=1000)
    ap.add_argument("--concurrent", type=int, default=100)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pause", type=float, default=0.02, help="seconds each client waits between calls")
    ap.add_argument("--kinds", default="health,health,stats,stats,exec",
                    help="calls the clients choose from, with repeats as weights")
    ap.add_argument("--proto", choices=("ttrpc", "grpc"), default="ttrpc", help="the clients' protocol")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    result = run_soak(args.sequential, args.concurrent, args.clients, args.pause,
                      log=lambda m: print(m, file=sys.stderr), kinds=tuple(args.kinds.split(",")),
                      proto=args.proto)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    return 1 if result["leaks"] or result["load"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
