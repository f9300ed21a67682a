"""The gRPC services: grpc.AgentService built from the handlers in agent.rpc, and Kata's grpc.Health.

This is the one place that turns domain errors into gRPC status codes. Every AgentService method is
served: by its handler, or with UNIMPLEMENTED saying so.
"""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from agent import PROTOCOL_VERSION, __version__, rpc
from agent.context import Agent
from agent.errors import AgentError, Unimplemented, status_of
from agent.protocols import agent_pb2, agent_pb2_grpc, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
METHODS: tuple[str, ...] = tuple(m.name for m in AGENT_SERVICE.methods)


def _method(name: str, handler):
    async def call(self: "AgentService", request, context: grpc.aio.ServicerContext):
        agent = self.agent
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        message = ""
        try:
            if agent.policy is not None:
                agent.policy.check(name, request)
            if handler is None:
                raise Unimplemented(f"{name} is not implemented by this agent")
            return await handler(agent, request, context)
        except AgentError as exc:
            code, message = status_of(exc)
        except Exception as exc:  # noqa: BLE001 - any bug becomes INTERNAL, never a crash
            code, message = status_of(exc)
            log.exception("%s failed", name, extra={"fields": {"method": name}})
        finally:
            _record(agent, name, code, message, start)
        await context.abort(code, message)

    call.__name__ = name
    return call


def _record(agent: Agent | None, name: str, code: grpc.StatusCode, message: str, start: float) -> None:
    """Count and (at debug level) log one finished call."""
    seconds = time.perf_counter() - start
    if agent is not None and agent.metrics is not None:
        agent.metrics.observe_rpc(name, code.name, seconds)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("rpc", extra={"fields": {"method": name, "code": code.name,
                                           "ms": round(seconds * 1000, 3), "error": message}})


def agent_service_class(handlers: dict) -> type:
    """A servicer class with one coroutine per AgentService method."""
    unknown = set(handlers) - set(METHODS)
    if unknown:
        raise RuntimeError(f"handlers for methods not in AgentService: {sorted(unknown)}")
    body = {name: _method(name, handlers.get(name)) for name in METHODS}
    return type("AgentService", (agent_pb2_grpc.AgentServiceServicer,), body)


class KataHealth(health_pb2_grpc.HealthServicer):
    """Kata's grpc.Health: SERVING while the agent serves, and the versions."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def Check(self, request, context):
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if self.agent.stopping.is_set()
                  else health_pb2.HealthCheckResponse.SERVING)
        return health_pb2.HealthCheckResponse(status=status)

    async def Version(self, request, context):
        return health_pb2.VersionCheckResponse(grpc_version=PROTOCOL_VERSION, agent_version=__version__)


def build_agent_service(agent: Agent):
    cls = agent_service_class(rpc.load_all())
    servicer = cls()
    servicer.agent = agent
    return servicer


def add_service(server: grpc.aio.Server, servicer, service) -> None:
    """Register every unary method of `service` (a ServiceDescriptor) on `servicer`.

    The generated add_*_to_server functions let grpcio parse request bodies, and a body that does
    not parse then ends as UNKNOWN "Unexpected DecodeError". Here the handlers receive the raw bytes
    and parse them themselves, so a corrupt or truncated body answers INVALID_ARGUMENT naming the
    method and the message type, before any handler or policy sees it; it is counted and logged
    as other calls are.
    """
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            raise RuntimeError(f"{service.full_name}/{method.name}: streaming methods are not supported")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _decoding(method.name, getattr(servicer, method.name), request_cls),
            request_deserializer=None,
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _decoding(name: str, fn, request_cls):
    agent = getattr(getattr(fn, "__self__", None), "agent", None)  # for metrics and the log

    async def handle(body: bytes, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        try:
            request = request_cls.FromString(body)
        except DecodeError as exc:
            message = f"{name}: request is not a valid {request_cls.DESCRIPTOR.full_name}: {exc}"
            _record(agent, name, grpc.StatusCode.INVALID_ARGUMENT, message, start)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return await fn(request, context)

    handle.__name__ = name
    return handle
