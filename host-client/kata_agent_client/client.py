"""A blocking client for the agent: ``connect("tcp://127.0.0.1:1024").health()``.

It speaks ttrpc by default, as Kata's own shims do, or gRPC (``proto="grpc"``); the agent serves
both on every address. Either way a failed call raises ``grpc.RpcError`` with ``code()`` and
``details()``, so callers handle both protocols alike.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
from google.protobuf import json_format, message_factory

from agent import ttrpc
from agent.config import parse_address
from agent.protocols import agent_pb2, health_pb2
from kata_agent_client.dial import SERIAL_GAP, keep_serial_gap, dial, serial_hung_up  # noqa: F401

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
MAX_MESSAGE = 64 << 20
PROTOCOLS = ("ttrpc", "grpc")


class TtrpcError(grpc.RpcError):
    """A ttrpc call's failure, shaped as grpc's: ``code()`` and ``details()``."""

    def __init__(self, status: ttrpc.Status) -> None:
        super().__init__(str(status))
        self._code = grpc.StatusCode[status.code.name]
        self._details = status.message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _TtrpcChannel:
    """One ttrpc connection, made on first use and made again after the agent hung up.

    A connection idle for IDLE_CHECK seconds is looked at before it is used again, so that a
    call after the agent restarted goes to the new agent instead of failing on the old socket.
    """

    IDLE_CHECK = 0.1

    def __init__(self, addr: Address) -> None:
        self.addr = addr
        self._lock = threading.Lock()
        self._client: ttrpc.Client | None = None
        self._used = 0.0

    def client(self, timeout: float | None = None) -> ttrpc.Client:
        with self._lock:
            now = time.monotonic()
            client = self._client
            if client is not None and (client.closed or (now - self._used > self.IDLE_CHECK and not client.alive())):
                client.close()
                client = None
            if client is None:
                client = self._client = ttrpc.Client(dial(self.addr, timeout))
            self._used = now
            return client

    def call(self, service: str, method: str, request, reply_cls, timeout: float | None):
        try:
            payload = self.client(timeout).call(service, method, request.SerializeToString(), timeout=timeout)
        except ttrpc.Status as status:
            raise TtrpcError(status) from None
        except OSError as exc:
            raise TtrpcError(ttrpc.ConnectionClosed(f"cannot reach {self.addr}: {exc.strerror or exc}")) from None
        return reply_cls.FromString(payload)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class _TtrpcStub:
    """``stub.Method(request, timeout=...)`` for every method of a service, as a gRPC stub has."""

    def __init__(self, channel: _TtrpcChannel, service) -> None:
        for m in service.methods:
            reply_cls = message_factory.GetMessageClass(m.output_type)

            def call(request, timeout=None, *, _name=m.name, _reply=reply_cls):
                return channel.call(service.full_name, _name, request, _reply, timeout)

            setattr(self, m.name, call)


class AgentClient:
    """Typed helpers for the common calls, and ``call`` for any AgentService method."""

    def __init__(self, addr: str, *, timeout: float | None = 30.0, proto: str = "ttrpc") -> None:
        if proto not in PROTOCOLS:
            raise ValueError(f"proto must be one of {', '.join(PROTOCOLS)}, not {proto!r}")
        self.addr = parse_address(addr)
        if self.addr.scheme == "vsock" and self.addr.cid == 0xFFFFFFFF:
            raise ValueError(f"{self.addr}: a client needs a real CID, not -1")
        self.timeout = timeout
        self.proto = proto
        if proto == "grpc":
            from agent.protocols import agent_pb2_grpc, health_pb2_grpc

            if self.addr.scheme == "serial":
                keep_serial_gap(self.addr.host)
            self.channel = grpc.insecure_channel(self.addr.grpc_target(), options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ])
            self.agent = agent_pb2_grpc.AgentServiceStub(self.channel)
            self.kata_health = health_pb2_grpc.HealthStub(self.channel)
        else:
            self.channel = _TtrpcChannel(self.addr)
            self.agent = _TtrpcStub(self.channel, AGENT_SERVICE)
            self.kata_health = _TtrpcStub(self.channel, HEALTH_SERVICE)

    def close(self) -> None:
        self.channel.close()
        if self.proto == "grpc" and self.addr.scheme == "serial":
            serial_hung_up(self.addr.host)

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Return once the agent accepts a connection; raise TimeoutError (or grpc's) after ``timeout``."""
        if self.proto == "grpc":
            ready = grpc.channel_ready_future(self.channel)
            try:
                ready.result(timeout=timeout)
            except BaseException:
                ready.cancel()  # else it keeps polling the channel, and fails once that is closed
                raise
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.channel.client(timeout=max(0.01, deadline - time.monotonic()))
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.addr}: not reachable within {timeout:g} s: {exc}") from None
                time.sleep(0.02)

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
