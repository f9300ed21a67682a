"""Memory of the agent on this machine: idle, after many lifecycles, beside a bare grpcio server.

    sudo .venv/bin/python bench/rss.py [--rounds 1000] [--proto ttrpc|grpc]

The agent (``python -m agent``, as the tests start it) is measured once it answers over ttrpc,
then after ``--rounds`` lifecycles of /bin/true (create, start, wait, remove) over ``--proto``;
its processes are the agent itself and the spawner's two (the spawner and its zygote, both
children of the agent). The peer is the bare health server of the guest image
(guest-image/stub_agent.py: grpcio with the two health services), measured after its first
Health.Check. RSS counts every page a process maps (shared libraries too); PSS splits shared
pages between the processes that map them; anonymous memory is what the process alone costs.
All from /proc/PID/smaps_rollup. Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "host-client")]

from kata_agent_client.client import AgentClient  # noqa: E402
from kata_agent_client.spec import spec_from_config  # noqa: E402
from lifecycle import agent_lifecycle, bundle  # noqa: E402  (bench/ is this script's directory)
from tests.support import AgentProcess, free_port  # noqa: E402

STUB = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/guest-image']; import stub_agent; "
        "stub_agent.main({'agent.server_addr': sys.argv[2]})")


def memory_kb(pid: int) -> dict[str, int]:
    """Rss, Pss and Anonymous of ``pid``, in kB."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].rstrip(":") in ("Rss", "Pss", "Anonymous"):
            out[parts[0].rstrip(":")] = int(parts[1])
    return out


def children(pid: int) -> list[int]:
    return [int(k) for k in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def line(name: str, kb: dict[str, int]) -> str:
    return (f"  {name:34s} RSS {kb['Rss'] / 1024:6.1f} MB   PSS {kb['Pss'] / 1024:6.1f} MB   "
            f"anonymous {kb['Anonymous'] / 1024:6.1f} MB")


def agent_report(title: str, pid: int) -> dict[str, int]:
    print(title)
    kb = memory_kb(pid)
    print(line("agent", kb))
    for child in children(pid):
        try:
            print(line(f"spawner process {child}", memory_kb(child)))
        except OSError:  # a container's process that just ended
            continue
    return kb


def bare_grpcio_server() -> dict[str, int]:
    addr = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", STUB, str(ROOT), addr],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = AgentClient(addr, timeout=30, proto="grpc")
        try:
            client.wait_ready(timeout=30)
        finally:
            client.close()
        time.sleep(1)
        return memory_kb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=1000, help="lifecycles between the two measurements")
    p.add_argument("--proto", choices=("ttrpc", "grpc"), default="ttrpc",
                   help="protocol of the lifecycles (gRPC loads grpcio into the agent on its first call)")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = pathlib.Path(tmp_s)
        b = bundle(tmp / "bundle", ["true"])
        oci = spec_from_config(json.loads((b / "config.json").read_text()))
        agent = AgentProcess(tmp, ["--log-level", "info"])
        client = AgentClient(agent.addr, timeout=60, proto=opts.proto)
        try:
            time.sleep(1)
            idle = agent_report("agent idle (answered one ttrpc Health.Check)", agent.pid)
            agent_lifecycle(client, oci, 0)
            first = memory_kb(agent.pid)
            for i in range(1, opts.rounds + 1):
                agent_lifecycle(client, oci, i)
            time.sleep(1)
            after = agent_report(f"agent after {opts.rounds + 1} lifecycles over {opts.proto}", agent.pid)
        finally:
            client.close()
            agent.stop()
    stub = bare_grpcio_server()
    print("bare grpcio server (guest-image/stub_agent.py, after one Health.Check)")
    print(line("stub", stub))
    print(f"agent RSS idle {idle['Rss'] / 1024:.1f} MB; after the first lifecycle {first['Rss'] / 1024:.1f} MB, "
          f"after {opts.rounds} more {after['Rss'] / 1024:.1f} MB (growth {(after['Rss'] - first['Rss']) / 1024:+.1f} MB, "
          f"{(after['Rss'] - idle['Rss']) / 1024:+.1f} MB from idle); bare grpcio server {stub['Rss'] / 1024:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
