#!/usr/bin/env python3
"""Containers inside the guest, measured from the host over each channel and protocol.

    python3 bench/vm_containers.py [--runs 30] [--containers 10] [--accel tcg]
                                   [--channel serial,tcp] [--proto ttrpc,grpc] [--json out.json]

Boots one x86_64 guest (microvm, virtio-fs share), creates a sandbox whose shared directory holds
one busybox rootfs, then reports:
  - lifecycle latency of /bin/true: CreateContainer + StartContainer + WaitProcess +
    RemoveContainer, per step and in total (median, p90, min);
  - exec latency: ExecProcess + WaitProcess of /bin/true in a running container;
  - the agent's VmRSS (PID 1) and the spawner's, idle and with N `sleep` containers running, and
    the guest's MemAvailable drop for those N;
  - the Health.Check round trip, per channel (virtio-serial beside QEMU's TCP hostfwd) and
    protocol (ttrpc beside gRPC).
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "host-client"))

from agent.protocols import agent_pb2, health_pb2, oci_pb2  # noqa: E402
from kata_agent_client.client import AgentClient  # noqa: E402
from kata_agent_client.spec import DEFAULT_ENV  # noqa: E402
from qemu.vm import Guest  # noqa: E402
from tests.vm import helpers as h  # noqa: E402


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1e3, 2),
            "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1e3, 2), "min_ms": round(xs[0] * 1e3, 2), "n": len(xs)}


def guest_memory(g: Guest) -> dict:
    _, out = g.shell("grep VmRSS /proc/1/status; "
                     "for p in /proc/[0-9]*; do grep -q 'agent.runtime.spawner' $p/cmdline 2>/dev/null "
                     "&& grep VmRSS $p/status | sed 's/VmRSS/SpawnerRSS/' && break; done; "
                     "grep MemAvailable /proc/meminfo", timeout=30)
    val = lambda key: int(m.group(1)) if (m := re.search(key + r":\s+(\d+)", out)) else None  # noqa: E731
    return {"agent_rss_kib": val("VmRSS"), "spawner_rss_kib": val("SpawnerRSS"),
            "mem_available_kib": val("MemAvailable")}


def lifecycle(stub, root: str, runs: int) -> dict:
    steps: dict[str, list[float]] = {k: [] for k in ("create", "start", "wait", "remove", "total")}
    for i in range(runs):
        cid = f"bench-{i}"
        t0 = time.perf_counter()
        h.create(stub, cid, ["/bin/true"], root)
        t1 = time.perf_counter()
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        t2 = time.perf_counter()
        status = h.wait(stub, cid)
        t3 = time.perf_counter()
        stub.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid, timeout=10), timeout=30)
        t4 = time.perf_counter()
        assert status == 0, status
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            steps[k].append(v)
    return {k: stats(v) for k, v in steps.items()}


def exec_latency(stub, root: str, runs: int) -> dict:
    cid = "bench-exec"
    h.create(stub, cid, ["sleep", "600"], root)
    stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
    times = []
    try:
        for i in range(runs):
            proc = oci_pb2.Process(Args=["/bin/true"], Env=DEFAULT_ENV, Cwd="/", User=oci_pb2.User())
            t0 = time.perf_counter()
            stub.ExecProcess(agent_pb2.ExecProcessRequest(container_id=cid, exec_id=f"e{i}", process=proc),
                             timeout=30)
            assert h.wait(stub, cid, f"e{i}") == 0
            times.append(time.perf_counter() - t0)
    finally:
        h.remove(stub, cid)
    return stats(times)


def measure(g: Guest, proto: str, runs: int, containers: int, memory: bool) -> dict:
    """One protocol on one booted guest: Health round trip, lifecycle, exec; memory if asked."""
    result: dict = {}
    template = h.busybox_rootfs(Path(g.run_dir))
    root = h.place_rootfs(g.share_dir, template, f"bench-{proto}")
    with AgentClient(g.addr, proto=proto, timeout=60) as client:
        client.wait_ready(10)
        stub = client.agent
        rtts = []
        for _ in range(50):
            t0 = time.perf_counter()
            client.kata_health.Check(health_pb2.CheckRequest(), timeout=10)
            rtts.append(time.perf_counter() - t0)
        result["health_rtt"] = stats(rtts)
        stub.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="bench", sandbox_id="bench",
                                                          storages=[h.shared_storage()]), timeout=60)
        try:
            if memory:
                result["memory_idle"] = guest_memory(g)
            lifecycle(stub, root, 3)  # warm up
            result["lifecycle_true"] = lifecycle(stub, root, runs)
            result["exec_true"] = exec_latency(stub, root, runs)
            if memory:
                ids = [f"idle-{i}" for i in range(containers)]
                for cid in ids:
                    h.create(stub, cid, ["sleep", "600"], root)
                    stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
                time.sleep(1)
                result["memory_busy"] = guest_memory(g)
                for cid in ids:
                    stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id=cid, signal=signal.SIGKILL),
                                       timeout=10)
                    h.remove(stub, cid)
        finally:
            stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--containers", type=int, default=10)
    p.add_argument("--accel", default="tcg", choices=["auto", "kvm", "tcg"])
    p.add_argument("--channel", default="serial,tcp", help="channels to compare, comma-separated "
                   "(serial: virtio-serial; tcp: QEMU's hostfwd; vsock where the host has it)")
    p.add_argument("--proto", default="ttrpc,grpc", help="protocols, comma-separated")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    results: dict = {}
    for n, channel in enumerate(a.channel.split(",")):
        g = Guest(accel=a.accel, debug_console=True, name=f"bench-ctr-{channel}", boot_timeout=180, channel=channel)
        try:
            g.start()
            for m, proto in enumerate(a.proto.split(",")):
                r = measure(g, proto, a.runs, a.containers, memory=(n == 0 and m == 0))
                r["boot_s"], r["accel"] = round(g.boot_seconds, 2), g.used_accel
                results[f"{channel}/{proto}"] = r
        finally:
            g.cleanup()

    print(f"{'channel/proto':16} {'boot s':>7} {'Health ms':>10} {'lifecycle ms':>13} {'create':>7} "
          f"{'start':>6} {'wait':>6} {'remove':>7} {'exec ms':>8}   (medians; TCG guest)")
    for key, r in results.items():
        lc, ex = r["lifecycle_true"], r["exec_true"]
        print(f"{key:16} {r['boot_s']:7.2f} {r['health_rtt']['median_ms']:10.2f} {lc['total']['median_ms']:13.1f} "
              f"{lc['create']['median_ms']:7.1f} {lc['start']['median_ms']:6.1f} {lc['wait']['median_ms']:6.1f} "
              f"{lc['remove']['median_ms']:7.1f} {ex['median_ms']:8.1f}")
    first = next(iter(results.values()))
    if "memory_idle" in first:
        idle, busy = first["memory_idle"], first["memory_busy"]
        print(f"agent RSS idle {idle['agent_rss_kib']} KiB (spawner {idle['spawner_rss_kib']} KiB); with "
              f"{a.containers} containers {busy['agent_rss_kib']} KiB (spawner {busy['spawner_rss_kib']} KiB); "
              f"guest MemAvailable -{(idle['mem_available_kib'] - busy['mem_available_kib'])} KiB")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
