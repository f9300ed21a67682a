"""A blocking client for the agent: ``connect("tcp://127.0.0.1:1024").health()``."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from agent.config import Address, parse_address
from agent.protocols import agent_pb2, agent_pb2_grpc, health_pb2, health_pb2_grpc

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
MAX_MESSAGE = 64 << 20


def _target(addr: Address) -> str:
    if addr.scheme == "vsock" and addr.cid == 0xFFFFFFFF:
        raise ValueError(f"{addr}: a client needs a real CID, not -1")
    return addr.grpc_target()


class AgentClient:
    """Typed helpers for the common calls, and ``call`` for any AgentService method."""

    def __init__(self, addr: str, *, timeout: float | None = 30.0) -> None:
        self.addr = parse_address(addr)
        self.timeout = timeout
        self.channel = grpc.insecure_channel(_target(self.addr), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ])
        self.agent = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.kata_health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=timeout)
        except BaseException:
            ready.cancel()  # else it keeps polling the channel, and fails once that is closed
            raise

    # --- health ---
    def health(self) -> str:
        reply = self.kata_health.Check(health_pb2.CheckRequest(), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def version(self) -> dict[str, str]:
        reply = self.kata_health.Version(health_pb2.CheckRequest(), timeout=self.timeout)
        return {"agent_version": reply.agent_version, "protocol_version": reply.grpc_version}

    # --- any method ---
    @staticmethod
    def request_type(method: str):
        m = AGENT_SERVICE.methods_by_name.get(method)
        if m is None:
            raise ValueError(f"no AgentService method {method!r}")
        from google.protobuf import message_factory

        return message_factory.GetMessageClass(m.input_type)

    def call(self, method: str, request: Any = None, *, timeout: float | None = None) -> Any:
        """Call ``method`` with a request message, a dict (JSON form) or None (an empty request)."""
        cls = self.request_type(method)
        if request is None:
            request = cls()
        elif isinstance(request, dict):
            request = json_format.ParseDict(request, cls())
        return getattr(self.agent, method)(request, timeout=timeout if timeout is not None else self.timeout)

    def call_json(self, method: str, request_json: dict | None = None, **kw) -> dict:
        reply = self.call(method, request_json or {}, **kw)
        return json_format.MessageToDict(reply, preserving_proto_field_name=True)


def connect(addr: str, **kw) -> AgentClient:
    return AgentClient(addr, **kw)
