"""The vsock relay joins any stream listener to the gRPC server's private unix socket.

vsock itself is not available on this host, so a TCP listener stands in for it: the relay code
does not depend on the address family.
"""

from __future__ import annotations

import asyncio
import socket

import grpc

from agent.config import Config
from agent.context import Agent
from agent.protocols import health_pb2, health_pb2_grpc
from agent.service import KataHealth
from agent.vsock import Relay, relay_backend_path


def test_grpc_through_the_relay(tmp_path):
    async def main():
        backend = relay_backend_path(str(tmp_path))
        assert (tmp_path / "kata-agent").stat().st_mode & 0o777 == 0o700
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(KataHealth(Agent(config=Config())), server)
        server.add_insecure_port(f"unix:{backend}")
        await server.start()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        relay = Relay(listener, backend, "test")
        await relay.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                replies = await asyncio.gather(*(stub.Check(health_pb2.CheckRequest()) for _ in range(20)))
            big = b"x" * (3 << 20)  # a message larger than any single relay read
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                echo = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.CheckRequest(service=big.decode()))
        finally:
            await relay.close()
            await server.stop(None)
        return replies, echo

    replies, echo = asyncio.run(main())
    assert [r.status for r in replies] == [health_pb2.HealthCheckResponse.SERVING] * 20
    assert echo.status == health_pb2.HealthCheckResponse.SERVING
    assert not any(tmp_path.joinpath("kata-agent").iterdir()), "relay socket left behind"
