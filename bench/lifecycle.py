"""Lifecycle latency of /bin/true: the agent over ttrpc and gRPC vs ``crun run`` and ``runc run``, interleaved.

    sudo .venv/bin/python bench/lifecycle.py [-n 50] [--proto ttrpc|grpc|both] [--concurrent 100] [--rss-rounds 1000] [--userns]

Each round runs one agent lifecycle (Create+Start+Wait+Remove) per protocol, one ``runc run`` and
one ``crun run`` of the same bundle, in turn, and reports medians (and the agent's per-RPC
medians), and Health.Check round trips over each protocol. The sections after the first use the
first protocol given (ttrpc with ``both``).
Then exec latency (ExecProcess + Wait of /bin/true vs ``runc exec``); then N lifecycles started
at once (agent, and crun for comparison): total time and p50/p99 per container; the CPU time
of the whole machine per lifecycle, each runner's lifecycles back to back; then the agent's RSS
idle and after many lifecycles.

crun refuses hybrid cgroups (v1 controllers plus cgroup2 at /sys/fs/cgroup/unified). By default
the benchmark enters a private mount namespace with that cgroup2 mount unmounted, and runs the
agent, runc and crun there: all three see the same v1 hierarchies and run without wrappers.
``--hybrid`` keeps the machine's view for the agent and runc and wraps crun alone in
``unshare -m`` + ``sh`` (which adds a few ms to crun's times). Either way, what crun writes below
the hidden mount point (on the machine's /sys/fs/cgroup tmpfs) is removed after each run.
Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "host-client")]

from google.protobuf import json_format  # noqa: E402

from agent import linux  # noqa: E402
from agent.protocols import agent_pb2  # noqa: E402
from agent.protocols.oci_pb2 import Spec  # noqa: E402
from kata_agent_client.client import AgentClient  # noqa: E402
from kata_agent_client.spec import default_config, spec_from_config  # noqa: E402
from tests.support import AgentProcess, make_busybox_rootfs, shift_ids  # noqa: E402

CRUN_WRAP = ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'umount -l /sys/fs/cgroup/unified 2>/dev/null || exec "$@"; '
             'for id; do :; done; "$@"; rc=$?; rm -rf "/sys/fs/cgroup/unified/$id"; exit $rc', "sh"]
UNIFIED = pathlib.Path("/sys/fs/cgroup/unified")
CRUN: list[str] = [*CRUN_WRAP, "crun"]  # main() drops the wrapper when all three share a v1 view


def v1_view() -> bool:
    """Enter a private mount namespace without the hybrid cgroup2 mount, for this process and the
    agent, runc and crun it starts: all three then see the same cgroup v1 hierarchies, and crun
    runs directly, without the unshare/sh wrapper (a few ms of its own). Nothing changes outside
    this namespace. False when there is no such mount to hide."""
    if not UNIFIED.is_mount():
        return False
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.umount2(str(UNIFIED), linux.MNT_DETACH)
    return True


def forget_unified(cid: str) -> None:
    """crun also makes its cgroup under the (now plain) directory that held the cgroup2 mount:
    that directory is on the machine's /sys/fs/cgroup tmpfs, so remove what it made there."""
    shutil.rmtree(UNIFIED / cid, ignore_errors=True)


USERNS_HOST = 100000  # --userns: container ids 0-65535 are the host's 100000-165535


def bundle(tmp: pathlib.Path, args: list[str], userns: bool = False) -> pathlib.Path:
    rootfs = make_busybox_rootfs(tmp / "rootfs")
    cfg = default_config(args, rootfs=str(rootfs))
    cfg["root"]["readonly"] = False
    if userns:  # the root owned by the mapped range; its parents walkable by the mapped root
        shift_ids(rootfs, USERNS_HOST)
        for d in (tmp, tmp.parent):
            os.chmod(d, 0o755)
        cfg["linux"]["namespaces"].append({"type": "user"})
        for key in ("uidMappings", "gidMappings"):
            cfg["linux"][key] = [{"containerID": 0, "hostID": USERNS_HOST, "size": 65536}]
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


RPC_TIMES: dict[str, dict[str, list[float]]] = {}


def agent_lifecycle(c: AgentClient, oci: Spec, i: int, record: bool = False) -> None:
    """One lifecycle over ``c``'s protocol. The spec is a message already: converting config.json
    to protobuf is the host shim's work, done once per bundle (json_format in Python takes ~1.5 ms)."""
    cid = f"bench-{i}-{c.proto}"
    marks = [time.perf_counter()]
    c.call("CreateContainer", agent_pb2.CreateContainerRequest(container_id=cid, OCI=oci))
    marks.append(time.perf_counter())
    c.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    marks.append(time.perf_counter())
    status = c.call("WaitProcess", agent_pb2.WaitProcessRequest(container_id=cid)).status
    marks.append(time.perf_counter())
    c.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
    marks.append(time.perf_counter())
    assert status == 0, status
    if record:
        times = RPC_TIMES.setdefault(c.proto, {"create": [], "start": [], "wait": [], "remove": []})
        for name, a, b in zip(times, marks, marks[1:]):
            times[name].append((b - a) * 1000)


def cli_run(argv: list[str], b: pathlib.Path, i: int) -> None:
    subprocess.run([*argv, "run", "--bundle", str(b), f"bench-{i}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lifecycles(clients: list[AgentClient], b: pathlib.Path, n: int) -> dict[str, list[float]]:
    oci = spec_from_config(json.loads((b / "config.json").read_text()))
    runners = {f"agent/{c.proto}": (lambda i, c=c: agent_lifecycle(c, oci, i, record=i >= 3)) for c in clients}
    if shutil.which("runc"):
        runners["runc"] = lambda i: cli_run(["runc"], b, i)
    if shutil.which("crun"):
        runners["crun"] = lambda i: cli_run(CRUN, b, i)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(n + 3):
        for name, fn in runners.items():
            ms = timed(lambda: fn(i))
            if i >= 3:  # warm-up
                times[name].append(ms)
        if CRUN[0] == "crun":  # untimed: what crun left under the hidden mount point
            forget_unified(f"bench-{i}")
    return times


def busy_cpu_ms() -> float:
    """CPU time spent on this machine so far, all CPUs, but idle and iowait (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy * 1000 / os.sysconf("SC_CLK_TCK")


def cpu_per_lifecycle(client: AgentClient, b: pathlib.Path, n: int) -> dict[str, tuple[float, float]]:
    """Each runner's lifecycles back to back, in blocks of ``n``: CPU time of the whole machine
    (client, agent, spawner, inits; or crun and its children) and wall time, per lifecycle, in ms.
    On a machine with few CPUs the total CPU work bounds the latency as much as any critical path."""
    oci = spec_from_config(json.loads((b / "config.json").read_text()))
    runners = {"agent": lambda i: agent_lifecycle(client, oci, i)}
    if shutil.which("crun"):
        runners["crun"] = lambda i: cli_run(CRUN, b, i)
    if shutil.which("runc"):
        runners["runc"] = lambda i: cli_run(["runc"], b, i)
    out = {}
    for name, fn in runners.items():
        cpu0, wall0 = busy_cpu_ms(), time.perf_counter()
        for i in range(n):
            fn(30_000 + i)
        cpu, wall = busy_cpu_ms() - cpu0, (time.perf_counter() - wall0) * 1000
        if name == "crun" and CRUN[0] == "crun":
            for i in range(n):
                forget_unified(f"bench-{30_000 + i}")
        out[name] = (cpu / n, wall / n)
    return out


def execs(client: AgentClient, b: pathlib.Path, n: int) -> dict[str, list[float]]:
    sleeper = json.loads((b / "config.json").read_text())
    sleeper["process"]["args"] = ["sleep", "1000"]
    oci = json_format.MessageToDict(spec_from_config(sleeper))
    c = client
    c.call("CreateContainer", {"container_id": "bench-exec", "OCI": oci})
    c.call("StartContainer", {"container_id": "bench-exec"})
    sb = b.parent / "sleeper"
    sb.mkdir()
    (sb / "config.json").write_text(json.dumps(sleeper))
    runc = subprocess.Popen(["runc", "run", "--bundle", str(sb), "bench-runc-exec"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    proc = {"Args": ["true"], "Env": ["PATH=/bin"], "Cwd": "/"}
    times: dict[str, list[float]] = {"agent": [], "runc": []}
    try:
        for i in range(n):
            def agent_exec() -> None:
                c.call("ExecProcess", {"container_id": "bench-exec", "exec_id": f"e{i}", "process": proc})
                assert c.call("WaitProcess", {"container_id": "bench-exec", "exec_id": f"e{i}"}).status == 0
            times["agent"].append(timed(agent_exec))
            times["runc"].append(timed(lambda: subprocess.run(
                ["runc", "exec", "bench-runc-exec", "true"], check=True)))
    finally:
        subprocess.run(["runc", "kill", "bench-runc-exec", "KILL"], stderr=subprocess.DEVNULL)
        runc.wait()
        subprocess.run(["runc", "delete", "-f", "bench-runc-exec"], stderr=subprocess.DEVNULL)
        c.call("RemoveContainer", {"container_id": "bench-exec"})
    return times


def concurrent_lifecycles(client: AgentClient, b: pathlib.Path, n: int) -> dict[str, tuple[float, list[float]]]:
    """n lifecycles started at once: (total ms, per-container ms) for the agent and for crun."""
    oci = spec_from_config(json.loads((b / "config.json").read_text()))
    runners = {"agent": lambda i: agent_lifecycle(client, oci, 10_000 + i)}
    if shutil.which("crun"):
        runners["crun"] = lambda i: cli_run(CRUN, b, 10_000 + i)
    out = {}
    for name, fn in runners.items():
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            start = time.perf_counter()
            per = list(pool.map(lambda i: timed(lambda: fn(i)), range(n)))
            out[name] = ((time.perf_counter() - start) * 1000, per)
        if name == "crun" and CRUN[0] == "crun":
            for i in range(n):
                forget_unified(f"bench-{10_000 + i}")
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def health_round_trips(clients: list[AgentClient], n: int = 2000) -> dict[str, list[float]]:
    """Health.Check round trips, the protocols interleaved in blocks of 100, in ms."""
    out: dict[str, list[float]] = {c.proto: [] for c in clients}
    for _ in range(n // 100):
        for c in clients:
            for _ in range(100):
                out[c.proto].append(timed(c.health))
    return out


def report(title: str, times: dict[str, list[float]]) -> None:
    print(title)
    for name, values in times.items():
        print(f"  {name:11s} median {statistics.median(values):7.2f} ms   "
              f"p90 {sorted(values)[int(len(values) * 0.9)]:7.2f} ms   n={len(values)}")


def rss_kb(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def agent_python_pid(agent: AgentProcess) -> int:
    return agent.pid  # unshare -> sh -> python all exec in place


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=50)
    p.add_argument("--proto", choices=("ttrpc", "grpc", "both"), default="both",
                   help="the agent's protocol(s) (default both, interleaved)")
    p.add_argument("--log-level", default="info", help="the agent's (tests run it at debug)")
    p.add_argument("--concurrent", type=int, default=100, help="lifecycles started at once (0: skip)")
    p.add_argument("--rss-rounds", type=int, default=0, help="lifecycles for the RSS growth check")
    p.add_argument("--cpu-rounds", type=int, default=100,
                   help="lifecycles back to back per runner for the CPU time per lifecycle (0: skip)")
    p.add_argument("--userns", action="store_true",
                   help="containers in a user namespace (0 -> 100000, 65536 ids), for all three")
    p.add_argument("--hybrid", action="store_true",
                   help="keep this machine's hybrid cgroups for the agent and runc (crun then runs "
                        "in a wrapper that hides the cgroup2 mount from it alone)")
    opts = p.parse_args()
    if not opts.hybrid and v1_view():  # before any thread exists: unshare(CLONE_NEWNS) needs that
        CRUN[:] = ["crun"]
        print("cgroups: v1 hierarchies only, for all three (cgroup2 mount hidden in a private mount namespace)")
    else:
        print("cgroups: as mounted; crun runs in an unshare wrapper that hides the cgroup2 mount")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = pathlib.Path(tmp_s)
        b = bundle(tmp / "bundle", ["true"], opts.userns)
        agent = AgentProcess(tmp, ["--log-level", opts.log_level])
        protos = ["ttrpc", "grpc"] if opts.proto == "both" else [opts.proto]
        clients = [AgentClient(agent.addr, timeout=60, proto=proto) for proto in protos]
        first = clients[0]
        try:
            pid = agent_python_pid(agent)
            idle_kb = rss_kb(pid)
            report("lifecycle of /bin/true (create+start+wait+remove)", lifecycles(clients, b, opts.n))
            for proto, times in RPC_TIMES.items():
                print(f"  agent/{proto} per RPC (median ms): " + "  ".join(
                    f"{k} {statistics.median(v):.2f}" for k, v in times.items()))
            trips = health_round_trips(clients)
            print("Health.Check round trip (interleaved in blocks of 100)")
            for proto, values in trips.items():
                print(f"  {proto:6s} p50 {pct(values, 0.5) * 1000:7.1f} us   p90 {pct(values, 0.9) * 1000:7.1f} us")
            if opts.cpu_rounds:
                print(f"CPU time per lifecycle, all processes ({opts.cpu_rounds} back to back each)")
                for name, (cpu, wall) in cpu_per_lifecycle(first, b, opts.cpu_rounds).items():
                    print(f"  {name:6s} cpu {cpu:7.2f} ms   wall {wall:7.2f} ms")
            if shutil.which("runc"):
                report("exec of /bin/true into a running container", execs(first, b, opts.n))
            if opts.concurrent:
                print(f"{opts.concurrent} lifecycles started at once")
                for name, (total, per) in concurrent_lifecycles(first, b, opts.concurrent).items():
                    print(f"  {name:6s} total {total:8.1f} ms   per container p50 {pct(per, 0.5):7.1f} ms   "
                          f"p99 {pct(per, 0.99):7.1f} ms")
            if opts.rss_rounds:
                oci = spec_from_config(json.loads((b / "config.json").read_text()))
                before = rss_kb(pid)
                for i in range(opts.rss_rounds):
                    agent_lifecycle(first, oci, 20_000 + i)
                after = rss_kb(pid)
                print(f"agent RSS: {idle_kb} kB idle at start, {before} kB before and {after} kB after "
                      f"{opts.rss_rounds} more lifecycles (growth {(after - before) / 1024:.1f} MB)")
        finally:
            for c in clients:
                c.close()
            agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
