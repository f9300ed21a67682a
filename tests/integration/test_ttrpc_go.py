"""The agent driven by an independent ttrpc client: containerd's own ttrpc package, in Go.

tests/ttrpc_go/main.go is built here against Debian's golang-github-containerd-ttrpc-dev (GOPATH
mode, offline). It keeps one ttrpc connection, as a Kata shim does, and runs every call in a
goroutine of its own on it; this module encodes the requests and decodes the replies.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import queue
import shutil
import socket
import subprocess
import threading

import grpc
import pytest

from agent.protocols import agent_pb2, health_pb2
from tests.reliability.containers import spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "ttrpc_go" / "main.go"
GOPATH_SYSTEM = "/usr/share/gocode"
AGENT = "grpc.AgentService"


@pytest.fixture(scope="session")
def ttrpc_call(tmp_path_factory) -> str:
    """The Go client, built once per session."""
    go = shutil.which("go")
    assert go, "go not found: tests/run.sh installs golang-go"
    assert os.path.isdir(f"{GOPATH_SYSTEM}/src/github.com/containerd/ttrpc"), \
        "containerd's ttrpc sources missing: tests/run.sh installs golang-github-containerd-ttrpc-dev"
    work = tmp_path_factory.mktemp("gopath")
    pkg = work / "src" / "ttrpccall"
    pkg.mkdir(parents=True)
    shutil.copy(SOURCE, pkg / "main.go")
    binary = work / "ttrpc-call"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{work}:{GOPATH_SYSTEM}",
           "GOCACHE": str(work / "cache"), "GOFLAGS": ""}
    r = subprocess.run([go, "build", "-o", str(binary), "."], cwd=pkg, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(binary)


class GoClient:
    """One ttrpc connection held by the Go tool; ``call`` waits, ``start``/``result`` overlap."""

    def __init__(self, binary: str, addr: str) -> None:
        self.proc = subprocess.Popen([binary, addr], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.results: dict[str, dict] = {}
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._tags = iter(range(1, 1 << 30))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def start(self, service: str, method: str, request, timeout_ms: int = 0) -> str:
        tag = f"t{next(self._tags)}"
        cmd = {"tag": tag, "service": service, "method": method, "timeout_ms": timeout_ms,
               "payload": base64.b64encode(request.SerializeToString()).decode()}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        return tag

    def result(self, tag: str, timeout: float = 60) -> dict:
        while tag not in self.results:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"ttrpc-call exited: {self.proc.stderr.read()}"
            assert not line.get("error"), line
            self.results[line["tag"]] = line
        return self.results.pop(tag)

    def call(self, method: str, request, reply_cls=None, service: str = AGENT, timeout_ms: int = 0):
        """The decoded reply; a failed call raises AssertionError with its code and message."""
        r = self.result(self.start(service, method, request, timeout_ms))
        assert r["code"] == 0, f"{method}: {grpc.StatusCode._value2member_map_.get(r['code'], r['code'])}: {r['message']}"
        reply_cls = reply_cls or _reply_type(service, method)
        return reply_cls.FromString(base64.b64decode(r["payload"] or ""))

    def code(self, method: str, request, service: str = AGENT, timeout_ms: int = 0) -> tuple[int, str]:
        r = self.result(self.start(service, method, request, timeout_ms))
        return r["code"], r["message"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"tag": "close", "close": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(10)


def _reply_type(service: str, method: str):
    from google.protobuf import message_factory

    pb = agent_pb2 if service == AGENT else health_pb2
    m = pb.DESCRIPTOR.services_by_name[service.split(".")[-1]].methods_by_name[method]
    return message_factory.GetMessageClass(m.output_type)


@pytest.fixture
def go(agent, ttrpc_call):
    client = GoClient(ttrpc_call, agent.addr)
    yield client
    client.close()


def test_health_check_and_version(go):
    check = go.call("Check", health_pb2.CheckRequest(), service="grpc.Health")
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    version = go.call("Version", health_pb2.CheckRequest(), service="grpc.Health")
    assert version.agent_version and version.grpc_version


def test_unknown_method_and_service_are_unimplemented(go):
    code, message = go.code("NoSuchMethod", health_pb2.CheckRequest())
    assert code == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert message == "grpc.AgentService/NoSuchMethod is not served by this agent"
    code, _ = go.code("Check", health_pb2.CheckRequest(), service="grpc.NoSuch")
    assert code == grpc.StatusCode.UNIMPLEMENTED.value[0]


def test_domain_errors_keep_their_code_and_message(go):
    code, message = go.code("StartContainer", agent_pb2.StartContainerRequest(container_id="../x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "container_id" in message


def test_a_sandbox_and_a_container_life(go, busybox_rootfs, container_id):
    go.call("CreateSandbox", agent_pb2.CreateSandboxRequest(hostname="go-sandbox", sandbox_id="go-sb"))
    oci = spec(busybox_rootfs, ["sh", "-c", "read x; echo got:$x; hostname; exec sleep 100"])
    go.call("CreateContainer", agent_pb2.CreateContainerRequest(container_id=container_id, OCI=oci))
    go.call("StartContainer", agent_pb2.StartContainerRequest(container_id=container_id))
    # a blocked WaitProcess on the one connection while everything else goes on
    wait = go.start(AGENT, "WaitProcess", agent_pb2.WaitProcessRequest(container_id=container_id))
    go.call("WriteStdin", agent_pb2.WriteStreamRequest(container_id=container_id, data=b"hello\n"))
    out = b""
    while b"go-sandbox\n" not in out:
        out += go.call("ReadStdout", agent_pb2.ReadStreamRequest(container_id=container_id, len=4096)).data
    assert out == b"got:hello\ngo-sandbox\n"
    for _ in range(5):
        assert go.call("Check", health_pb2.CheckRequest(), service="grpc.Health").status == 1
    go.call("ExecProcess", agent_pb2.ExecProcessRequest(
        container_id=container_id, exec_id="e1",
        process=spec(busybox_rootfs, ["sh", "-c", "echo exec:$((6*7)); exit 3"]).Process))
    assert go.call("WaitProcess", agent_pb2.WaitProcessRequest(container_id=container_id, exec_id="e1")).status == 3
    assert go.call("ReadStdout", agent_pb2.ReadStreamRequest(container_id=container_id, exec_id="e1",
                                                              len=4096)).data == b"exec:42\n"
    assert wait not in go.results  # still blocked
    go.call("SignalProcess", agent_pb2.SignalProcessRequest(container_id=container_id, signal=9))
    r = go.result(wait, timeout=20)
    assert r["code"] == 0 and agent_pb2.WaitProcessResponse.FromString(base64.b64decode(r["payload"])).status == 137
    go.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=container_id))
    code, _ = go.code("StartContainer", agent_pb2.StartContainerRequest(container_id=container_id))
    assert code == grpc.StatusCode.NOT_FOUND.value[0]
    go.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_a_deadline_ends_the_call_and_not_the_container(go, agent, busybox_rootfs, container_id):
    oci = spec(busybox_rootfs, ["sleep", "100"])
    go.call("CreateContainer", agent_pb2.CreateContainerRequest(container_id=container_id, OCI=oci))
    go.call("StartContainer", agent_pb2.StartContainerRequest(container_id=container_id))
    code, message = go.code("WaitProcess", agent_pb2.WaitProcessRequest(container_id=container_id), timeout_ms=300)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message
    # the agent cancelled its WaitProcess: the container runs on, and a new wait sees its end
    wait = go.start(AGENT, "WaitProcess", agent_pb2.WaitProcessRequest(container_id=container_id))
    go.call("SignalProcess", agent_pb2.SignalProcessRequest(container_id=container_id, signal=9))
    r = go.result(wait, timeout=20)
    assert agent_pb2.WaitProcessResponse.FromString(base64.b64decode(r["payload"])).status == 137
    go.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=container_id))


def test_junk_connections_leave_the_go_connection_alone(go, agent):
    host, port = agent.addr.removeprefix("tcp://").rsplit(":", 1)
    for junk in (b"\xff" * 64, b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            assert s.recv(16) == b""  # closed by the agent
    assert go.call("Check", health_pb2.CheckRequest(), service="grpc.Health").status == 1
