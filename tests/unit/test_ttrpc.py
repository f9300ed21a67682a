"""ttrpc on the wire (agent.ttrpc, agent.server): raw frames against an in-process front."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import grpc
import pytest

from agent import server, ttrpc
from agent.protocols import agent_pb2, health_pb2, ttrpc_pb2
from kata_agent_client.client import AgentClient
from tests.unit.served import served

HEADER = struct.Struct(">IIBB")


class Blocker:
    """A WaitProcess handler that blocks until released, recording how it ended."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended: list[str] = []
        self.release: asyncio.Event | None = None

    async def __call__(self, agent, request):
        self.release = asyncio.Event()
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        self.ended.append("returned")
        return agent_pb2.WaitProcessResponse(status=int(request.container_id or 0))


def connect(addr: str) -> socket.socket:
    host, _, port = addr.removeprefix("tcp://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def request(service: str, method: str, payload: bytes = b"", timeout_nano: int = 0) -> bytes:
    return ttrpc_pb2.Request(service=service, method=method, payload=payload,
                             timeout_nano=timeout_nano).SerializeToString()


def send(sock: socket.socket, stream_id: int, data: bytes, kind: int = ttrpc.REQUEST) -> None:
    sock.sendall(HEADER.pack(len(data), stream_id, kind, 0) + data)


def recv(sock: socket.socket) -> tuple[int, ttrpc_pb2.Response]:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
        return buf

    length, stream_id, kind, _ = HEADER.unpack(exact(HEADER.size))
    assert kind == ttrpc.RESPONSE
    return stream_id, ttrpc_pb2.Response.FromString(exact(length))


def health(sock: socket.socket, stream_id: int) -> None:
    send(sock, stream_id, request("grpc.Health", "Check", health_pb2.CheckRequest().SerializeToString()))


def closed_by_peer(sock: socket.socket, within: float = 5.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_frame_reader_cuts_a_stream_fed_byte_by_byte():
    data = ttrpc.frame(1, 1, b"abc") + ttrpc.frame(3, 2, b"") + ttrpc.frame(5, 3, b"x" * 300)
    reader = ttrpc.FrameReader()
    got = [f for i in range(len(data)) for f in reader.feed(data[i:i + 1])]
    assert got == [(1, 1, b"abc"), (3, 2, b""), (5, 3, b"x" * 300)]
    assert reader.pending == 0


def test_frame_reader_skips_an_oversized_frame_in_pieces():
    big = HEADER.pack(ttrpc.MAX_DATA + 5, 7, 1, 0)
    reader = ttrpc.FrameReader()
    got = list(reader.feed(big + b"y" * 1000))
    assert got == [(7, 1, None)]
    rest = b"y" * (ttrpc.MAX_DATA + 5 - 1000)
    got = [f for i in range(0, len(rest), 1 << 20) for f in reader.feed(rest[i:i + (1 << 20)])]
    got += list(reader.feed(ttrpc.frame(9, 1, b"ok")))
    assert got == [(9, 1, b"ok")]


def test_a_long_poll_does_not_hold_up_the_calls_behind_it():
    blocker = Blocker()
    with served({"WaitProcess": blocker}) as s:
        sock = connect(s.addr)
        send(sock, 1, request("grpc.AgentService", "WaitProcess",
                              agent_pb2.WaitProcessRequest(container_id="7").SerializeToString()))
        assert blocker.started.wait(5)
        health(sock, 3)
        stream_id, reply = recv(sock)
        assert stream_id == 3 and reply.status.code == 0
        assert health_pb2.HealthCheckResponse.FromString(reply.payload).status == health_pb2.HealthCheckResponse.SERVING
        s.loop.call_soon_threadsafe(blocker.release.set)
        stream_id, reply = recv(sock)
        assert stream_id == 1 and agent_pb2.WaitProcessResponse.FromString(reply.payload).status == 7
        sock.close()
    assert blocker.ended == ["returned"]


def test_deadline_cancels_the_handler_and_answers_deadline_exceeded():
    blocker = Blocker()
    with served({"WaitProcess": blocker}) as s:
        sock = connect(s.addr)
        start = time.monotonic()
        send(sock, 1, request("grpc.AgentService", "WaitProcess", b"", timeout_nano=200_000_000))
        stream_id, reply = recv(sock)
        took = time.monotonic() - start
        assert stream_id == 1 and reply.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "deadline" in reply.status.message
        assert 0.15 < took < 5
        sock.close()
    assert blocker.ended == ["cancelled"]


def test_a_closed_connection_cancels_its_calls():
    blocker = Blocker()
    with served({"WaitProcess": blocker}) as s:
        sock = connect(s.addr)
        send(sock, 1, request("grpc.AgentService", "WaitProcess", b""))
        assert blocker.started.wait(5)
        sock.close()
        deadline = time.monotonic() + 5
        while not blocker.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not s.front.conns
    assert blocker.ended == ["cancelled"]


@pytest.mark.parametrize("second_id", [2, 1, 3])
def test_even_or_reused_stream_ids_are_refused_and_the_connection_lives(second_id):
    with served({}) as s:
        sock = connect(s.addr)
        health(sock, 5)
        assert recv(sock)[1].status.code == 0
        health(sock, second_id)
        stream_id, reply = recv(sock)
        assert stream_id == second_id and reply.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "odd and increasing" in reply.status.message
        health(sock, 7)
        assert recv(sock) [0] == 7
        sock.close()


def test_an_oversized_frame_is_answered_and_the_connection_lives():
    with served({}) as s:
        sock = connect(s.addr)
        sock.sendall(HEADER.pack(ttrpc.MAX_DATA + 1, 1, ttrpc.REQUEST, 0) + b"\0" * (ttrpc.MAX_DATA + 1))
        stream_id, reply = recv(sock)
        assert stream_id == 1 and reply.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        health(sock, 3)
        stream_id, reply = recv(sock)
        assert stream_id == 3 and reply.status.code == 0
        sock.close()


@pytest.mark.parametrize("service,method", [("grpc.AgentService", "NoSuchMethod"), ("no.Such", "Check"),
                                            ("grpc.health.v1.Health", "Check")])
def test_unknown_service_or_method_is_unimplemented(service, method):
    with served({}) as s:
        sock = connect(s.addr)
        send(sock, 1, request(service, method))
        _, reply = recv(sock)
        assert reply.status.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert reply.status.message == f"{service}/{method} is not served by this agent"
        sock.close()


def test_an_undecodable_envelope_is_invalid_argument():
    with served({}) as s:
        sock = connect(s.addr)
        send(sock, 1, b"\x0a\x7f")
        _, reply = recv(sock)
        assert reply.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "ttrpc.Request" in reply.status.message
        health(sock, 3)
        assert recv(sock)[1].status.code == 0
        sock.close()


def test_other_frame_types_are_ignored():
    with served({}) as s:
        sock = connect(s.addr)
        send(sock, 1, b"data", kind=ttrpc.DATA)
        send(sock, 3, b"\x12\x00", kind=ttrpc.RESPONSE)
        health(sock, 5)
        assert recv(sock)[0] == 5
        sock.close()


def test_junk_closes_that_connection_only(monkeypatch):
    monkeypatch.setattr(server, "SNIFF_SECONDS", 0.3)
    with served({}) as s:
        good = connect(s.addr)
        junk = connect(s.addr)
        junk.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert closed_by_peer(junk)
        half = connect(s.addr)
        half.sendall(server.HTTP2_PREFACE[:10])
        assert closed_by_peer(half)  # after SNIFF_SECONDS
        health(good, 1)  # connected first, silent until now
        assert recv(good)[1].status.code == 0
        for sock in (good, junk, half):
            sock.close()


def test_grpc_and_ttrpc_clients_on_one_port_at_once():
    blocker = Blocker()

    async def echo(agent, request):
        return agent_pb2.ReadStreamResponse(data=request.container_id.encode())

    with served({"WaitProcess": blocker, "ReadStdout": echo}) as s:
        with AgentClient(s.addr, proto="grpc") as g, AgentClient(s.addr) as t:
            results = []
            waiter = threading.Thread(target=lambda: results.append(
                t.call("WaitProcess", agent_pb2.WaitProcessRequest(container_id="3")).status))
            waiter.start()
            assert blocker.started.wait(5)
            for _ in range(10):
                assert g.health() == "SERVING" and t.health() == "SERVING"
            big = "x" * (3 << 20)  # larger than any single read of the relay
            for client in (g, t):
                assert client.call("ReadStdout", agent_pb2.ReadStreamRequest(container_id=big)).data == big.encode()
            s.loop.call_soon_threadsafe(blocker.release.set)
            waiter.join(5)
            assert results == [3]


def test_grpcio_speaking_before_the_relay_is_joined_reaches_the_client(monkeypatch):
    """grpcio speaks first on its socket (its SETTINGS). A loop may deliver those bytes before the
    coroutine that opened the connection resumes (uvloop does); they reached an end of the pipe
    that had no peer yet, and the client's connection died."""
    opened = asyncio.unix_events._UnixSelectorEventLoop.create_unix_connection

    async def delivered_first(self, factory, path=None, **kwargs):
        heard = asyncio.Event()

        def protocol():
            made = factory()
            received = made.data_received

            def data_received(data):
                heard.set()
                received(data)

            made.data_received = data_received
            return made

        connection = await opened(self, protocol, path, **kwargs)
        await asyncio.wait_for(heard.wait(), 10)  # grpcio's first bytes, before the caller resumes
        return connection

    monkeypatch.setattr(asyncio.unix_events._UnixSelectorEventLoop, "create_unix_connection", delivered_first)
    with served({}) as s, AgentClient(s.addr, proto="grpc") as g:
        assert g.health() == "SERVING"


def test_the_blocking_client_serves_many_threads_on_one_connection():
    async def echo(agent, request):
        await asyncio.sleep(0.001 * (len(request.container_id) % 5))
        return agent_pb2.WaitProcessResponse(status=len(request.container_id))

    with served({"WaitProcess": echo}) as s:
        with AgentClient(s.addr) as client:
            results: dict[int, int] = {}

            def one(n: int) -> None:
                for _ in range(20):
                    reply = client.call("WaitProcess", agent_pb2.WaitProcessRequest(container_id="x" * n))
                    results[n] = reply.status

            threads = [threading.Thread(target=one, args=(n,)) for n in range(1, 33)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert results == {n: n for n in range(1, 33)}


def test_client_deadline_and_reconnect_after_the_agent_hangs_up():
    blocker = Blocker()
    with served({"WaitProcess": blocker}) as s:
        with AgentClient(s.addr) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.call("WaitProcess", agent_pb2.WaitProcessRequest(), timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for conn in list(s.front.conns):
                s.loop.call_soon_threadsafe(conn.close)
            time.sleep(0.2)
            assert client.health() == "SERVING"  # a new connection
