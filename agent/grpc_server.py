"""The gRPC side: a grpcio server on one private unix socket, fed by the agent's listeners.

Imported only when the first gRPC connection arrives (agent.server sniffs every connection):
a host that speaks ttrpc never pays for grpcio, its threads or its memory. The server registers
every method of the agent's one service table (agent.service.Services) with raw bytes in and
out, so request decoding, policy, metrics and status mapping are the table's, as on ttrpc. It
adds what only gRPC clients use: grpc.health.v1 and server reflection, so that
``grpcurl -plaintext HOST:PORT list`` works without .proto files.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health as std_health
from grpc_health.v1 import health_pb2 as std_health_pb2
from grpc_health.v1 import health_pb2_grpc as std_health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.errors import AgentError
from agent.service import Method, Services

MAX_MESSAGE = 64 << 20
SHUTDOWN_GRACE = 2.0


def _handler(services: Services, method: Method):
    key = (method.service, method.name)

    async def handle(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:  # the table's entry now: grpcio may have started before serve() filled it
            return await services.call(services.methods[key], body)
        except AgentError as exc:
            await context.abort(grpc.StatusCode[exc.code.name], exc.message)

    handle.__name__ = method.name
    return handle


class GrpcServer:
    """grpcio's aio server for ``services``, listening on ``target`` (``unix:PATH``, ``HOST:PORT``)."""

    def __init__(self, services: Services, target: str) -> None:
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ])
        for service in services.service_names:
            handlers = {m.name: grpc.unary_unary_rpc_method_handler(_handler(services, m))
                        for m in services.by_service(service)}
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.health = std_health.aio.HealthServicer()
        std_health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.names = (*services.service_names, std_health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                      reflection.SERVICE_NAME)
        reflection.enable_server_reflection(self.names, self.server)
        self.port = self.server.add_insecure_port(target)
        self.service_names = services.service_names

    async def start(self) -> None:
        await self.server.start()
        for name in ("", *self.service_names):
            await self.health.set(name, std_health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(SHUTDOWN_GRACE)
