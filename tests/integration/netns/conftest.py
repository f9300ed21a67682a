"""Network namespaces for network tests: nothing here touches this machine's own interfaces.

``netns`` is a fresh named network namespace (deleted afterwards) with ``netns.ip(...)`` to run
``ip`` inside it. ``netns_agent`` is the agent started inside that namespace (and, as every agent
in tests, in a private mount namespace with its own /run), reached over a unix socket because a
loopback TCP port inside the namespace is not reachable from the test.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tests.support import ROOT, AgentProcess


class Netns:
    def __init__(self) -> None:
        self.name = "kt-" + uuid.uuid4().hex[:10]
        subprocess.run(["ip", "netns", "add", self.name], check=True)

    def ip(self, *args: str) -> str:
        done = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def exec(self, *argv: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], input=input, capture_output=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def netns():
    ns = Netns()
    yield ns
    ns.delete()


class NetnsAgent(AgentProcess):
    """The agent inside ``ip netns exec NAME``, listening on a unix socket in a short temp dir."""

    def __init__(self, ns: Netns) -> None:  # noqa: super().__init__ would start it in this netns
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="kt-"))
        self.addr = f"unix://{self.dir}/agent.sock"
        self.log_path = self.dir / "agent.log"
        self._log = open(self.log_path, "wb")
        cmd = ["ip", "netns", "exec", ns.name, "unshare", "--mount", "--propagation", "private", "--",
               "sh", "-c", 'mount -t tmpfs -o mode=755 agent-run /run && exec "$@"', "sh",
               sys.executable, "-m", "agent", "--server-addr", self.addr, "--log-level", "debug",
               "--cmdline-file", "/dev/null"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        from kata_agent_client import AgentClient

        self.client = AgentClient(self.addr, timeout=30)
        deadline = time.monotonic() + 20
        while not (self.dir / "agent.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"agent did not start:\n{self.logs()}")
            time.sleep(0.05)
        self.client.wait_ready(timeout=10)


@pytest.fixture
def netns_agent(netns):
    agent = NetnsAgent(netns)
    yield agent
    rc = agent.stop()
    shutil.rmtree(agent.dir, ignore_errors=True)
    assert rc == 0, f"agent exited with {rc}:\n{agent.logs()}"
