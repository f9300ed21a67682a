"""The virtio-serial listener (agent.serial) through the agent's front, with a pty as the port.

A pty's master behaves as the guest end of a virtio-serial port: it reports POLLHUP while nothing
holds the slave, and serves again once the slave is opened. A relay thread plays QEMU's chardev:
it accepts one host connection at a time on a unix socket and opens the slave for its duration.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import struct
import threading
import time
import tty

import grpc
import pytest

from agent import ttrpc
from agent.protocols import agent_pb2
from kata_agent_client.client import SERIAL_GAP, AgentClient
from tests.unit.served import served


class Chardev:
    """QEMU's side: a unix socket server whose one connection at a time is joined to the port."""

    def __init__(self, path: str) -> None:
        self.master, slave = os.openpty()
        self.slave_path = os.ttyname(slave)
        tty.setraw(slave)
        os.close(slave)  # no host yet: the master hangs up
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.path = path
        self.sessions = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.listener.settimeout(0.1)
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            slave = os.open(self.slave_path, os.O_RDWR | os.O_NOCTTY)
            tty.setraw(slave)
            self.sessions += 1
            sel = selectors.DefaultSelector()
            sel.register(conn, selectors.EVENT_READ)
            sel.register(slave, selectors.EVENT_READ)
            try:
                while not self.stop.is_set():
                    for key, _ in sel.select(0.1):
                        if key.fileobj is conn:
                            data = conn.recv(65536)
                            if not data:
                                raise EOFError
                            os.write(slave, data)
                        else:
                            conn.sendall(os.read(slave, 65536))
            except (EOFError, OSError):
                pass
            finally:
                sel.close()
                conn.close()
                os.close(slave)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()  # the master is the agent's port now: the front closes it


async def _read(agent, request):
    """A long poll: answers once the test releases it, with the request's exec id as data."""
    await agent.release.wait()
    return agent_pb2.ReadStreamResponse(data=request.exec_id.encode())


async def _echo(agent, request):
    return agent_pb2.WaitProcessResponse(status=len(request.container_id))


@pytest.fixture
def channel(tmp_path):
    with served({"ReadStdout": _read, "WaitProcess": _echo}) as s:
        s.agent.release = s.run(_event())
        dev = Chardev(str(tmp_path / "agent.sock"))
        s.run(_serve(s, dev))
        try:
            yield s, f"serial://{dev.path}", dev
        finally:
            dev.close()


async def _event():
    return asyncio.Event()


async def _serve(s, dev):
    s.front.serve_serial("pty", fd=dev.master)


def _signal(client, name="abc"):
    return client.agent.WaitProcess(agent_pb2.WaitProcessRequest(container_id=name), timeout=5)


@pytest.mark.parametrize("proto", ["ttrpc", "grpc"])
def test_calls_and_a_long_poll_over_the_serial_port(channel, proto):
    s, addr, dev = channel
    with AgentClient(addr, proto=proto, timeout=10) as c:
        assert c.health() == "SERVING"
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("read", c.agent.ReadStdout(
            agent_pb2.ReadStreamRequest(container_id="c", exec_id="7"), timeout=10)))
        t.start()
        time.sleep(0.2)
        assert t.is_alive()  # the long poll is open ...
        assert _signal(c, "abcd").status == 4  # ... and other calls pass beside it
        s.loop.call_soon_threadsafe(s.agent.release.set)
        t.join(10)
        assert result["read"].data == b"7"


@pytest.mark.parametrize("first,second", [("ttrpc", "grpc"), ("grpc", "ttrpc"), ("ttrpc", "ttrpc")])
def test_a_new_host_after_a_hang_up_is_served(channel, first, second):
    s, addr, dev = channel
    with AgentClient(addr, proto=first, timeout=10) as c:
        assert _signal(c).status == 3
    with AgentClient(addr, proto=second, timeout=10) as c:
        assert _signal(c, "abcdef").status == 6
    assert dev.sessions == 2


def test_a_half_frame_from_a_dead_host_does_not_wedge_the_next(channel):
    s, addr, dev = channel
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(dev.path)
    body = b"\x0a\x05grpc."  # the start of a ttrpc.Request
    sock.sendall(struct.pack(">IIBB", 200, 1, 1, 0) + body)  # announces 200 bytes, sends 7
    time.sleep(0.2)
    sock.close()  # dies mid-frame; the next host comes later (the host library keeps SERIAL_GAP)
    time.sleep(SERIAL_GAP)
    with AgentClient(addr, timeout=5) as c:
        assert c.health() == "SERVING"


def test_junk_is_discarded_until_that_host_hangs_up(channel):
    s, addr, dev = channel
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(dev.path)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    time.sleep(0.2)
    sock.sendall(ttrpc.frame(1, ttrpc.REQUEST, b""))  # a frame after junk is not served ...
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    sock.close()
    time.sleep(SERIAL_GAP)
    with AgentClient(addr, timeout=5) as c:  # ... and the next host is
        assert c.health() == "SERVING"


def test_stream_ids_starting_over_mean_a_new_host(channel):
    """If the guest never saw the hang-up (the host reconnected at once), ttrpc's stream ids
    starting over at 1 end the old host's calls instead of being refused as reused."""
    s, addr, dev = channel
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(dev.path)
    client = ttrpc.Client(sock)
    req = agent_pb2.WaitProcessRequest(container_id="ab").SerializeToString()
    assert client.call("grpc.AgentService", "WaitProcess", req, timeout=5)
    client2 = ttrpc.Client(socket.socket(fileno=os.dup(sock.fileno())))  # same stream, ids from 1
    reply = client2.call("grpc.AgentService", "WaitProcess", req, timeout=5)
    assert agent_pb2.WaitProcessResponse.FromString(reply).status == 2
    client2.close()
    client.close()


def test_a_missing_port_is_a_listen_error():
    from agent.config import parse_address
    from agent.server import ListenError

    with served({}) as s:
        with pytest.raises(ListenError, match="no virtio-serial port named 'nope'"):
            s.run(s.front.listen(parse_address("serial:///dev/virtio-ports/nope")))
