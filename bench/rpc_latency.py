"""Round trip of one call, ttrpc beside gRPC, and what serving both on one address costs gRPC.

    .venv/bin/python bench/rpc_latency.py [-n 3000] [--rounds 5] [--method Check|GetGuestDetails]

A server process holds the agent's service table (agent.service.Services, the real handlers'
wrapper; Kata's Health.Check answers with no domain work) and serves it two ways:
  - the agent's front on one loopback port: ttrpc and gRPC both, told apart by the first bytes,
    gRPC relayed to grpcio's private unix socket (what the agent does);
  - grpcio listening on a loopback port of its own, with the same table (what the agent did
    before it served ttrpc: the "before" of the relay's cost).
The client calls from this process over loopback TCP with the host library's blocking clients,
one connection each, in rounds that interleave the three ways; it prints p50 and p90 per way,
the median of the rounds, and gRPC's cost through the front against grpcio alone. Beside the
latency it prints the server process's CPU time per call (all its threads, from
/proc/PID/task/*/schedstat around each way's calls), a second view of what the relay adds; on
this shared VM both move with the machine's load, so compare ways within one run.
Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "host-client")]

SERVER = r"""
import asyncio, sys, tempfile
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/host-client"]
from agent.config import Address, Config
from agent.context import Agent
from agent.server import Front
from agent.service import Services
from agent.wiring import all_handlers

async def main():
    agent = Agent(config=Config())
    services = Services(agent, {"GetGuestDetails": all_handlers()["GetGuestDetails"]})
    front = Front(services, tempfile.mkdtemp(prefix="rpc-latency-"))
    bound = await front.listen(Address("tcp", host="127.0.0.1", port=0))
    await front.grpc_backend()  # started before timing, as after an agent's first gRPC call
    from agent.grpc_server import GrpcServer
    direct = GrpcServer(services, "127.0.0.1:0")
    await direct.start()
    print(bound.port, direct.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await front.close()
    await direct.stop()

asyncio.run(main())
"""


def cpu_us(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in microseconds (schedstat: nanoseconds on CPU)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return total / 1e3


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=3000, help="calls per way and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--method", default="Check", choices=("Check", "GetGuestDetails"))
    opts = p.parse_args()

    from agent.protocols import agent_pb2, health_pb2
    from kata_agent_client.client import AgentClient

    server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        front_port, direct_port = map(int, server.stdout.readline().split())
        ways = {
            "ttrpc (front)": AgentClient(f"tcp://127.0.0.1:{front_port}", proto="ttrpc"),
            "gRPC (front)": AgentClient(f"tcp://127.0.0.1:{front_port}", proto="grpc"),
            "gRPC (grpcio alone)": AgentClient(f"tcp://127.0.0.1:{direct_port}", proto="grpc"),
        }
        if opts.method == "Check":
            calls = {name: (lambda c=c: c.kata_health.Check(health_pb2.CheckRequest(), timeout=30))
                     for name, c in ways.items()}
        else:
            req = agent_pb2.GuestDetailsRequest(mem_block_size=True)
            calls = {name: (lambda c=c: c.agent.GetGuestDetails(req, timeout=30)) for name, c in ways.items()}
        for fn in calls.values():  # connect and warm up
            for _ in range(200):
                fn()
        p50s: dict[str, list[float]] = {k: [] for k in calls}
        p90s: dict[str, list[float]] = {k: [] for k in calls}
        cpus: dict[str, list[float]] = {k: [] for k in calls}
        for r in range(opts.rounds):
            for name, fn in calls.items():
                ts = []
                cpu = cpu_us(server.pid)
                for _ in range(opts.n):
                    t = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t)
                cpus[name].append((cpu_us(server.pid) - cpu) / opts.n)
                ts.sort()
                p50s[name].append(ts[len(ts) // 2] * 1e6)
                p90s[name].append(ts[int(len(ts) * 0.9)] * 1e6)
        print(f"{opts.method} round trip on loopback TCP, {opts.rounds} rounds of {opts.n} calls "
              f"(median of the rounds' p50 and p90), pid {os.getpid()}:")
        for name in calls:
            print(f"  {name:22s} p50 {statistics.median(p50s[name]):7.1f} us   "
                  f"p90 {statistics.median(p90s[name]):7.1f} us   "
                  f"server CPU {statistics.median(cpus[name]):6.1f} us/call   "
                  f"(round p50s {', '.join(f'{v:.0f}' for v in p50s[name])})")
        front, alone = statistics.median(p50s["gRPC (front)"]), statistics.median(p50s["gRPC (grpcio alone)"])
        print(f"  gRPC through the front costs {front - alone:+.1f} us at p50 ({(front / alone - 1) * 100:+.1f} %)")
        front, alone = statistics.median(cpus["gRPC (front)"]), statistics.median(cpus["gRPC (grpcio alone)"])
        print(f"  and {front - alone:+.1f} us of the server's CPU per call ({(front / alone - 1) * 100:+.1f} %)")
        for c in ways.values():
            c.close()
    finally:
        server.stdin.close()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
