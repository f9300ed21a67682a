"""Short soak (bench/soak.py in small): 50 sequential and 10 concurrent lifecycles while 10 client
connections issue health, stats and exec calls. Fails on growth beyond noise: fds, threads,
mounts, children and cgroups exactly back; RSS within a few MB; no failed call."""

from __future__ import annotations

import os

import pytest

from agent.protocols import agent_pb2, oci_pb2
from bench.soak import run_soak
from tests.support import make_busybox_rootfs
from tests.reliability.containers import create, read_all, spec
from tests.reliability.invariants import AgentState
from tests.reliability.isolated import IsolatedAgent

pytestmark = pytest.mark.timeout(240)
RSS_SLACK_MB = 8


@pytest.mark.parametrize("proto", ["ttrpc", "grpc"])
def test_short_soak(tmp_path, proto):
    result = run_soak(sequential=int(os.environ.get("SOAK_SEQUENTIAL", "50")),
                      concurrent=int(os.environ.get("SOAK_CONCURRENT", "10")), clients=10,
                      workdir=tmp_path, log=lambda m: None, proto=proto)
    assert result["load"]["errors"] == 0, result["load"]["first_errors"]
    assert not result["leaks"], result["leaks"]
    start, end = result["agent"]["start"], result["agent"]["end"]
    for key in ("fds", "threads", "mounts", "children", "zombies"):
        assert end[key] == start[key], (key, start, end)
    assert result["rss_growth_mb"] < RSS_SLACK_MB, result["agent"]
    assert result["load"]["health"]["n"] > 0 and result["load"]["exec"]["n"] > 0


def test_finished_execs_release_their_fds(tmp_path):
    """A long-running container with many short execs (health probes): once an exec is waited for
    and its output drained, the agent holds nothing for it."""
    agent = IsolatedAgent(tmp_path / "agent")
    try:
        rootfs = make_busybox_rootfs(agent.work / "rootfs")
        c = agent.client
        create(c, "probe", spec(rootfs, ["sleep", "1000"]))
        c.call("StartContainer", {"container_id": "probe"})

        def probe(i):
            eid = f"p{i}"
            c.call("ExecProcess", agent_pb2.ExecProcessRequest(
                container_id="probe", exec_id=eid, process=oci_pb2.Process(Args=["echo", "ok"], Cwd="/")))
            assert c.call("WaitProcess", {"container_id": "probe", "exec_id": eid}).status == 0
            assert read_all(c, "probe", exec_id=eid) == b"ok\n"
            read_all(c, "probe", "ReadStderr", exec_id=eid)

        probe(0)
        before = AgentState.take(agent.pid).fds
        for i in range(1, 41):
            probe(i)
        after = AgentState.take(agent.pid).fds
        assert after - before <= 2, f"40 finished execs: fds {before} -> {after}"
        c.call("RemoveContainer", {"container_id": "probe", "timeout": 5})
    finally:
        code = agent.stop()  # an assert here would hide the error that brought us here
    assert code == 0, f"agent exited with {code}"
