"""Lifecycle latency of /bin/true: the agent over gRPC vs ``crun run`` and ``runc run``, interleaved.

    sudo .venv/bin/python bench/lifecycle.py [-n 50]

Each round runs one agent lifecycle (Create+Start+Wait+Remove), one ``runc run`` and one
``crun run`` of the same bundle, in turn, and reports medians. Then exec latency (ExecProcess +
Wait of /bin/true vs ``runc exec``). crun refuses hybrid cgroups, so it runs inside
``unshare -m`` with /sys/fs/cgroup/unified unmounted in that private namespace only.
Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
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

from kata_agent_client.spec import default_config, spec_from_config  # noqa: E402
from tests.integration.conftest import AgentProcess, make_busybox_rootfs  # noqa: E402

CRUN_WRAP = ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec "$@"', "sh"]


def bundle(tmp: pathlib.Path, args: list[str]) -> pathlib.Path:
    rootfs = make_busybox_rootfs(tmp / "rootfs")
    cfg = default_config(args, rootfs=str(rootfs))
    cfg["root"]["readonly"] = False
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def agent_lifecycle(agent: AgentProcess, oci: dict, i: int) -> None:
    cid = f"bench-{i}"
    c = agent.client
    c.call("CreateContainer", {"container_id": cid, "OCI": oci})
    c.call("StartContainer", {"container_id": cid})
    status = c.call("WaitProcess", {"container_id": cid}).status
    c.call("RemoveContainer", {"container_id": cid})
    assert status == 0, status


def cli_run(argv: list[str], b: pathlib.Path, i: int) -> None:
    subprocess.run([*argv, "run", "--bundle", str(b), f"bench-{i}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lifecycles(agent: AgentProcess, b: pathlib.Path, n: int) -> dict[str, list[float]]:
    oci = json_format.MessageToDict(spec_from_config(json.loads((b / "config.json").read_text())))
    runners = {"agent": lambda i: agent_lifecycle(agent, oci, i)}
    if shutil.which("runc"):
        runners["runc"] = lambda i: cli_run(["runc"], b, i)
    if shutil.which("crun"):
        runners["crun"] = lambda i: cli_run([*CRUN_WRAP, "crun"], b, i)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(n + 3):
        for name, fn in runners.items():
            ms = timed(lambda: fn(i))
            if i >= 3:  # warm-up
                times[name].append(ms)
    return times


def execs(agent: AgentProcess, b: pathlib.Path, n: int) -> dict[str, list[float]]:
    sleeper = json.loads((b / "config.json").read_text())
    sleeper["process"]["args"] = ["sleep", "1000"]
    oci = json_format.MessageToDict(spec_from_config(sleeper))
    c = agent.client
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


def report(title: str, times: dict[str, list[float]]) -> None:
    print(title)
    for name, values in times.items():
        print(f"  {name:6s} median {statistics.median(values):7.2f} ms   "
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
    p.add_argument("--rss-rounds", type=int, default=0, help="lifecycles for the RSS growth check")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = pathlib.Path(tmp_s)
        b = bundle(tmp / "bundle", ["true"])
        agent = AgentProcess(tmp)
        try:
            report("lifecycle of /bin/true (create+start+wait+remove)", lifecycles(agent, b, opts.n))
            if shutil.which("runc"):
                report("exec of /bin/true into a running container", execs(agent, b, opts.n))
            if opts.rss_rounds:
                oci = json_format.MessageToDict(spec_from_config(json.loads((b / "config.json").read_text())))
                pid = agent_python_pid(agent)
                before = rss_kb(pid)
                for i in range(opts.rss_rounds):
                    agent_lifecycle(agent, oci, i)
                print(f"agent RSS: {before} kB idle, {rss_kb(pid)} kB after {opts.rss_rounds} lifecycles")
        finally:
            agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
