"""The one service table behind both transports: every case runs over ttrpc and over gRPC, and
both must give the same code, message and reply."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agent import ttrpc
from agent.errors import InvalidArgument, PermissionDenied
from agent.protocols import agent_pb2, health_pb2
from agent.service import METHODS, Services
from agent.context import Agent
from agent.config import Config
from kata_agent_client.client import AgentClient
from tests.unit.served import served

PROTOCOLS = ("ttrpc", "grpc")


async def _invalid(agent, request):
    raise InvalidArgument("container_id: empty")


async def _crash(agent, request):
    raise ZeroDivisionError("boom")


async def _oserror(agent, request):
    raise FileNotFoundError(2, "No such file or directory", "/run/x")


async def _echo_id(agent, request):
    return agent_pb2.WaitProcessResponse(status=len(request.container_id))


async def _empty(agent, request):
    return agent_pb2.google_dot_protobuf_dot_empty__pb2.Empty()


class DenyStart:
    def check(self, method, request):
        if method == "StartContainer":
            raise PermissionDenied(f"{method}: denied by rule no-start")


HANDLERS = {"StartContainer": _invalid, "RemoveContainer": _crash, "WaitProcess": _echo_id,
            "SignalProcess": _oserror, "PauseContainer": _empty}

# (method, request, expected code, expected message or reply)
CASES = [
    ("WaitProcess", agent_pb2.WaitProcessRequest(container_id="abcd"), "OK",
     agent_pb2.WaitProcessResponse(status=4)),
    ("StartContainer", agent_pb2.StartContainerRequest(container_id="x"), "PERMISSION_DENIED",
     "StartContainer: denied by rule no-start"),
    ("RemoveContainer", agent_pb2.RemoveContainerRequest(), "INTERNAL", "ZeroDivisionError: boom"),
    ("SignalProcess", agent_pb2.SignalProcessRequest(), "INTERNAL", "No such file or directory: /run/x"),
    ("ResumeContainer", agent_pb2.ResumeContainerRequest(), "UNIMPLEMENTED",
     "ResumeContainer is not implemented by this agent"),
    ("PauseContainer", agent_pb2.PauseContainerRequest(), "OK",
     agent_pb2.google_dot_protobuf_dot_empty__pb2.Empty()),
]


def _outcome(client: AgentClient, method: str, request):
    try:
        return "OK", client.call(method, request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def test_every_agent_service_method_is_in_the_table():
    services = Services(Agent(config=Config()), {})
    assert len(METHODS) == 42
    assert {name for (service, name) in services.methods if service == "grpc.AgentService"} == set(METHODS)
    assert set(services.service_names) == {"grpc.AgentService", "grpc.Health"}


def test_unknown_handler_name_is_refused():
    with pytest.raises(RuntimeError, match="NoSuchMethod"):
        Services(Agent(config=Config()), {"NoSuchMethod": _echo_id})


def test_one_table_of_cases_through_both_protocols():
    with served(HANDLERS, policy=DenyStart()) as s:
        got = {}
        for proto in PROTOCOLS:
            with AgentClient(s.addr, proto=proto) as client:
                got[proto] = [_outcome(client, m, req) for m, req, _, _ in CASES]
    expected = [(code, want) for _, _, code, want in CASES]
    assert got["ttrpc"] == expected
    assert got["grpc"] == expected


def test_undecodable_body_names_the_message_type_on_both():
    body = b"\x0a\xff"  # field 1, length 255, no bytes follow
    want = "StartContainer: request is not a valid grpc.StartContainerRequest"
    with served(HANDLERS) as s:
        with AgentClient(s.addr) as client:
            with pytest.raises(ttrpc.Status) as t_err:
                client.channel.client().call("grpc.AgentService", "StartContainer", body, timeout=10)
        with grpc.insecure_channel(s.addr.removeprefix("tcp://")) as ch:
            raw = ch.unary_unary("/grpc.AgentService/StartContainer")
            with pytest.raises(grpc.RpcError) as g_err:
                raw(body, timeout=10)
    assert g_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert g_err.value.details().startswith(want)
    assert t_err.value.code == 3 and t_err.value.message.startswith(want)


def test_calls_are_counted_alike_on_both():
    class Metrics:
        def __init__(self):
            self.seen = []

        def observe_rpc(self, method, code, seconds):
            self.seen.append((method, code))

    with served(HANDLERS) as s:
        s.agent.metrics = Metrics()
        for proto in PROTOCOLS:
            with AgentClient(s.addr, proto=proto) as client:
                _outcome(client, "WaitProcess", agent_pb2.WaitProcessRequest())
                _outcome(client, "StartContainer", agent_pb2.StartContainerRequest())
        seen = s.agent.metrics.seen
    assert seen == [("WaitProcess", "OK"), ("StartContainer", "INVALID_ARGUMENT")] * 2


def test_kata_health_check_and_version_on_both():
    with served({}) as s:
        for proto in PROTOCOLS:
            with AgentClient(s.addr, proto=proto) as client:
                assert client.health() == "SERVING"
                version = client.version()
                assert version["agent_version"] and version["protocol_version"]
        s.agent.stopping.set()
        with AgentClient(s.addr) as client:
            assert client.health() == "NOT_SERVING"


def test_health_answers_before_the_handlers_and_agent_calls_wait_for_them():
    # agent.wiring listens before the rest of the agent is built: Health answers at once, an
    # AgentService call waits for serve() and then runs its handler, through both protocols
    # (grpcio registers its methods once, possibly before serve())
    services = Services(Agent(config=Config()))

    async def scenario():
        health = await services.dispatch("grpc.Health", "Check", b"")
        waiting = asyncio.ensure_future(services.dispatch(
            "grpc.AgentService", "WaitProcess", agent_pb2.WaitProcessRequest(container_id="abc").SerializeToString()))
        await asyncio.sleep(0.05)
        early = waiting.done()
        services.serve(HANDLERS)
        return health, early, await asyncio.wait_for(waiting, 10)

    health, early, reply = asyncio.run(scenario())
    assert health_pb2.HealthCheckResponse.FromString(health).status == health_pb2.HealthCheckResponse.SERVING
    assert not early
    assert agent_pb2.WaitProcessResponse.FromString(reply).status == 3


def test_a_grpc_handler_made_before_serve_calls_the_served_handler():
    from agent.grpc_server import _handler

    services = Services(Agent(config=Config()))
    handle = _handler(services, services.methods[("grpc.AgentService", "WaitProcess")])  # grpcio started early
    services.serve(HANDLERS)
    body = agent_pb2.WaitProcessRequest(container_id="ab").SerializeToString()
    assert agent_pb2.WaitProcessResponse.FromString(asyncio.run(handle(body, None))).status == 2


def test_a_call_that_waited_for_serve_gets_the_served_handler():
    body = agent_pb2.WaitProcessRequest(container_id="ab").SerializeToString()

    async def main():
        services = Services(Agent(config=Config()))
        call = asyncio.ensure_future(services.dispatch("grpc.AgentService", "WaitProcess", body))
        await asyncio.sleep(0)
        assert not call.done()  # waits for the handlers
        services.serve(HANDLERS)
        return await call

    assert agent_pb2.WaitProcessResponse.FromString(asyncio.run(main())).status == 2
