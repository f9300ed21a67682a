"""The agent's services, once, for both transports: grpc.AgentService and Kata's grpc.Health.

``Services`` is one table of methods, keyed by full service name and method name, and one
wrapper every call goes through, whichever protocol brought it: decode the request (a body that
does not decode is INVALID_ARGUMENT naming the message type), check the policy, run the handler,
turn domain errors into a status code and message (agent.errors, the one place), count and log
the call. ttrpc reaches it through ``dispatch``; gRPC through ``agent.grpc_server``. Neither the
handlers nor this module know which protocol called.

Every AgentService method is served: by its handler, or with UNIMPLEMENTED saying so. A table
made before the handlers exist (``Services(agent)``, as agent.wiring does to answer Health while
the rest of the agent is built) answers Health at once, and an AgentService call waits for
``serve(handlers)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from agent import PROTOCOL_VERSION, __version__
from agent.context import Agent
from agent.errors import AgentError, Code, InvalidArgument, Unimplemented, status_of
from agent.protocols import agent_pb2, health_pb2
from agent.ttrpc import Status

log = logging.getLogger(__name__)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
METHODS: tuple[str, ...] = tuple(m.name for m in AGENT_SERVICE.methods)

Handler = Callable[[Agent, Message], Awaitable[Message]]


@dataclass(frozen=True)
class Method:
    service: str                  # full proto name: "grpc.AgentService"
    name: str                     # "CreateContainer"
    request_cls: type[Message]
    reply_cls: type[Message]
    handler: Handler | None       # None: answered UNIMPLEMENTED
    guarded: bool                 # checked by the policy, counted in the RPC metrics

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def _methods(service, handlers: dict[str, Handler], guarded: bool) -> list[Method]:
    out = []
    for m in service.methods:
        if m.client_streaming or m.server_streaming:
            raise RuntimeError(f"{service.full_name}/{m.name}: streaming methods are not supported")
        out.append(Method(service.full_name, m.name, message_factory.GetMessageClass(m.input_type),
                          message_factory.GetMessageClass(m.output_type), handlers.get(m.name), guarded))
    return out


class Services:
    """The table of every method the agent serves, and the one wrapper around each call."""

    def __init__(self, agent: Agent, handlers: dict[str, Handler] | None = None) -> None:
        self.agent = agent
        self.methods: dict[tuple[str, str], Method] = {}
        self._served = asyncio.Event()  # set by serve(): AgentService calls wait for it
        table = _methods(HEALTH_SERVICE, {"Check": health_check, "Version": health_version}, guarded=False)
        self._set(table + _methods(AGENT_SERVICE, {}, guarded=True))
        if handlers is not None:
            self.serve(handlers)

    def _set(self, table: list[Method]) -> None:
        self.methods.update({(m.service, m.name): m for m in table})

    def serve(self, handlers: dict[str, Handler]) -> None:
        """Put the AgentService handlers in the table; calls that waited for them go on."""
        unknown = set(handlers) - set(METHODS)
        if unknown:
            raise RuntimeError(f"handlers for methods not in AgentService: {sorted(unknown)}")
        self._set(_methods(AGENT_SERVICE, handlers, guarded=True))
        self._served.set()

    @property
    def service_names(self) -> list[str]:
        return sorted({m.service for m in self.methods.values()})

    def by_service(self, service: str) -> list[Method]:
        return [m for m in self.methods.values() if m.service == service]

    async def call(self, method: Method, body: bytes) -> bytes:
        """Run one call from its encoded request to its encoded reply; raises AgentError."""
        agent = self.agent
        start = time.perf_counter()
        code, message = Code.OK, ""
        try:
            if method.guarded and not self._served.is_set():  # the agent is still being built
                await self._served.wait()
                method = self.methods[(method.service, method.name)]  # the entry serve() put in
            try:
                request = method.request_cls.FromString(body)
            except DecodeError as exc:
                raise InvalidArgument(f"{method.name}: request is not a valid "
                                      f"{method.request_cls.DESCRIPTOR.full_name}: {exc}") from None
            if method.guarded and agent.policy is not None:
                agent.policy.check(method.name, request)
            if method.handler is None:
                raise Unimplemented(f"{method.name} is not implemented by this agent")
            return (await method.handler(agent, request)).SerializeToString()
        except AgentError as exc:
            code, message = status_of(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - any bug becomes INTERNAL, never a crash
            code, message = status_of(exc)
            log.exception("%s failed", method.name, extra={"fields": {"method": method.name}})
            raise _as_error(code, message) from exc
        except BaseException:  # cancelled: the client went away or its deadline passed
            code, message = Code.CANCELLED, "cancelled"
            raise
        finally:
            if method.guarded:
                _record(agent, method.name, code, message, start)

    async def dispatch(self, service: str, name: str, body: bytes, deadline: float | None = None) -> bytes:
        """The ttrpc entry: find the method, call it, carry a failure as ttrpc.Status."""
        method = self.methods.get((service, name))
        if method is None:
            raise Status(Code.UNIMPLEMENTED, f"{service}/{name} is not served by this agent")
        try:
            return await self.call(method, body)
        except AgentError as exc:
            raise Status(exc.code, exc.message) from None


def _as_error(code: Code, message: str) -> AgentError:
    err = AgentError(message)
    err.code = code
    return err


def _record(agent: Agent, name: str, code: Code, message: str, start: float) -> None:
    """Count and (at debug level) log one finished call."""
    seconds = time.perf_counter() - start
    if agent.metrics is not None:
        agent.metrics.observe_rpc(name, code.name, seconds)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("rpc", extra={"fields": {"method": name, "code": code.name,
                                           "ms": round(seconds * 1000, 3), "error": message}})


# Kata's grpc.Health: SERVING while the agent serves, and the versions.

async def health_check(agent: Agent, request) -> health_pb2.HealthCheckResponse:
    status = (health_pb2.HealthCheckResponse.NOT_SERVING if agent.stopping.is_set()
              else health_pb2.HealthCheckResponse.SERVING)
    return health_pb2.HealthCheckResponse(status=status)


async def health_version(agent: Agent, request) -> health_pb2.VersionCheckResponse:
    return health_pb2.VersionCheckResponse(grpc_version=PROTOCOL_VERSION, agent_version=__version__)
