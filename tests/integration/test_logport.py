"""The log port of a running agent: the lines it writes on stderr also reach a connected host,
with slog's level names; stderr keeps its own (unchanged) lines. A unix socket stands in for vsock."""

from __future__ import annotations

import json
import socket

import grpc
import pytest

pytestmark = pytest.mark.timeout(120)


def _lines_until(conn: socket.socket, buf: bytearray, want) -> list[dict]:
    """Lines read until one satisfies ``want``."""
    conn.settimeout(60)
    while True:
        lines = [json.loads(line) for line in bytes(buf).split(b"\n")[:-1]]
        if any(want(e) for e in lines):
            return lines
        chunk = conn.recv(65536)
        assert chunk, f"log port closed; got {bytes(buf)[-2000:]!r}"
        buf += chunk


def test_agent_log_lines_reach_the_log_port(agent_factory, tmp_path, container_id):
    path = tmp_path / "log.sock"
    agent = agent_factory(["--log-addr", f"unix://{path}"])
    with pytest.raises(grpc.RpcError):  # a failing call: a debug line naming it
        agent.client.call("StartContainer", {"container_id": container_id})
    buf = bytearray()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        lines = _lines_until(conn, buf, lambda e: container_id in e.get("error", ""))
    serving = [e for e in lines if e["msg"] == "agent serving"]
    assert serving and serving[0]["level"] == "INFO"  # logged before anyone connected: kept
    assert {e["level"] for e in lines} <= {"TRCE", "DEBG", "INFO", "WARN", "ERRO", "CRIT"}
    assert "DEBG" in {e["level"] for e in lines}  # the agent runs at debug level here
    console = [json.loads(line) for line in agent.logs().splitlines() if line.startswith("{")]
    assert [e["level"] for e in console if e["msg"] == "agent serving"] == ["info"]  # stderr unchanged
