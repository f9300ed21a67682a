"""The service layer in-process: UNIMPLEMENTED, error mapping, policy hook, health, reflection."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agent.config import Config
from agent.context import Agent
from agent.errors import InvalidArgument, PermissionDenied
from agent.protocols import agent_pb2, agent_pb2_grpc, health_pb2, health_pb2_grpc
from agent.service import METHODS, KataHealth, agent_service_class


async def _invalid(agent, request, context):
    raise InvalidArgument("container_id: empty")


async def _crash(agent, request, context):
    raise ZeroDivisionError("boom")


async def _echo_id(agent, request, context):
    return agent_pb2.WaitProcessResponse(status=len(request.container_id))


class DenyStart:
    def check(self, method, request):
        if method == "StartContainer":
            raise PermissionDenied(f"{method}: denied by rule no-start")


def run_with_server(handlers, body, policy=None):
    async def main():
        agent = Agent(config=Config(), policy=policy)
        server = grpc.aio.server()
        servicer = agent_service_class(handlers)()
        servicer.agent = agent
        agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(KataHealth(agent), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return await body(ch)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_every_agent_service_method_is_served():
    assert len(METHODS) == 42
    cls = agent_service_class({})
    assert all(callable(getattr(cls, m)) for m in METHODS)


def test_unknown_handler_name_is_refused():
    with pytest.raises(RuntimeError, match="NoSuchMethod"):
        agent_service_class({"NoSuchMethod": _echo_id})


async def _call(ch, method, request):
    stub = agent_pb2_grpc.AgentServiceStub(ch)
    try:
        return await getattr(stub, method)(request)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()


def test_unimplemented_names_the_method():
    got = run_with_server({}, lambda ch: _call(ch, "PauseContainer", agent_pb2.PauseContainerRequest()))
    assert got == (grpc.StatusCode.UNIMPLEMENTED, "PauseContainer is not implemented by this agent")


def test_domain_error_maps_to_its_code():
    got = run_with_server({"StartContainer": _invalid},
                          lambda ch: _call(ch, "StartContainer", agent_pb2.StartContainerRequest()))
    assert got == (grpc.StatusCode.INVALID_ARGUMENT, "container_id: empty")


def test_unexpected_exception_is_internal_and_server_lives_on():
    async def body(ch):
        first = await _call(ch, "StartContainer", agent_pb2.StartContainerRequest())
        second = await _call(ch, "WaitProcess", agent_pb2.WaitProcessRequest(container_id="abc"))
        return first, second

    first, second = run_with_server({"StartContainer": _crash, "WaitProcess": _echo_id}, body)
    assert first == (grpc.StatusCode.INTERNAL, "ZeroDivisionError: boom")
    assert second.status == 3


def test_policy_denies_before_the_handler_runs():
    called = []

    async def start(agent, request, context):
        called.append(request)
        return agent_pb2.google_dot_protobuf_dot_empty__pb2.Empty()

    got = run_with_server({"StartContainer": start},
                          lambda ch: _call(ch, "StartContainer", agent_pb2.StartContainerRequest()),
                          policy=DenyStart())
    assert got == (grpc.StatusCode.PERMISSION_DENIED, "StartContainer: denied by rule no-start")
    assert called == []


def test_kata_health_check_and_version():
    async def body(ch):
        stub = health_pb2_grpc.HealthStub(ch)
        return await stub.Check(health_pb2.CheckRequest()), await stub.Version(health_pb2.CheckRequest())

    check, version = run_with_server({}, body)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert version.agent_version and version.grpc_version
