"""The agent as a process on this machine: health services, reflection, UNIMPLEMENTED, the
contract seen by a client that knows only Kata's wire contract, long polls, and SIGTERM."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2 as std_health_pb2
from grpc_health.v1 import health_pb2_grpc as std_health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from agent.protocols import agent_pb2
from tests.protocol_contract import load_contract


def channel(agent) -> grpc.Channel:
    return grpc.insecure_channel(agent.addr.removeprefix("tcp://"))


def test_kata_health_and_version(agent):
    assert agent.client.health() == "SERVING"
    version = agent.client.version()
    assert version["agent_version"] and version["protocol_version"]


@pytest.mark.parametrize("service", ["", "grpc.AgentService", "grpc.Health"])
def test_standard_health_service(agent, service):
    with channel(agent) as ch:
        reply = std_health_pb2_grpc.HealthStub(ch).Check(std_health_pb2.HealthCheckRequest(service=service))
    assert reply.status == std_health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_services(agent):
    with channel(agent) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("grpc.AgentService").methods_by_name["CreateContainer"]
        spec = pool.FindMessageTypeByName("grpc.Spec")
    assert {"grpc.AgentService", "grpc.Health", "grpc.health.v1.Health"} <= services
    assert method.input_type.full_name == "grpc.CreateContainerRequest"
    assert spec.fields_by_name["Process"].number == 2


@pytest.mark.parametrize("method", ["MemAgentMemcgSet", "MemAgentCompactSet"])
def test_what_the_agent_does_not_do_answers_unimplemented(agent, method):
    """Every method has a handler (tests/unit/test_protocol.py); the mem-agent ones say why not."""
    with pytest.raises(grpc.RpcError) as err:
        agent.client.call(method)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.value.details().startswith(f"{method}: this agent has no memory agent")


def _contract_only_health_messages():
    """grpc.CheckRequest and grpc.HealthCheckResponse built from the contract JSON alone."""
    contract = load_contract()
    types = dict(descriptor_pb2.FieldDescriptorProto.Type.items())
    f = descriptor_pb2.FileDescriptorProto(name="contract_health.proto", package="grpc", syntax="proto3")
    for full in ("grpc.CheckRequest", "grpc.HealthCheckResponse"):
        msg = f.message_type.add(name=full.split(".")[-1])
        for name, field in contract["messages"][full].items():
            fd = msg.field.add(name=name, number=field["number"],
                               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                               type=types["TYPE_" + field["type"].upper()])
            if field.get("type_name"):
                fd.type_name = "." + field["type_name"]
        for enum_name, values in contract["enums"].items():
            if enum_name.rsplit(".", 1)[0] == full:
                enum = msg.enum_type.add(name=enum_name.rsplit(".", 1)[1])
                for vname, number in sorted(values.items(), key=lambda kv: kv[1]):
                    enum.value.add(name=vname, number=number)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    get = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(n))  # noqa: E731
    return get("grpc.CheckRequest"), get("grpc.HealthCheckResponse"), contract


def test_a_client_from_the_contract_alone_gets_serving(agent):
    request_cls, reply_cls, contract = _contract_only_health_messages()
    assert contract["services"]["grpc.Health"]["Check"]["input"] == "grpc.CheckRequest"
    with channel(agent) as ch:
        check = ch.unary_unary("/grpc.Health/Check", request_serializer=request_cls.SerializeToString,
                               response_deserializer=reply_cls.FromString)
        reply = check(request_cls(service=""), timeout=10)
    assert reply.status == contract["enums"]["grpc.HealthCheckResponse.ServingStatus"]["SERVING"]


def _long_poll(agent, results: list, n: int, timeout: float) -> list[threading.Thread]:
    """n GetOOMEvent calls that block until an OOM event or the deadline."""
    def one():
        try:
            agent.client.call("GetOOMEvent", agent_pb2.GetOOMEventRequest(), timeout=timeout)
            results.append("returned")
        except grpc.RpcError as exc:
            results.append(exc.code())

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_health_answers_with_500_long_polls_blocked(agent):
    results: list = []
    threads = _long_poll(agent, results, 500, timeout=30)
    time.sleep(2)  # let them all reach the agent and block
    assert results == [], f"long polls returned early: {results[:5]}"
    for _ in range(20):
        assert agent.client.health() == "SERVING"
    assert results == [], "Health.Check was answered only once the long polls had ended"
    assert agent.stop() == 0
    for t in threads:
        t.join(10)
    assert len(results) == 500 and "returned" not in results


def test_sigterm_ends_in_flight_calls_and_exits_zero(agent):
    results: list = []
    threads = _long_poll(agent, results, 5, timeout=60)
    time.sleep(1)
    start = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(20) == 0, agent.logs()
    for t in threads:
        t.join(10)
    assert time.monotonic() - start < 10
    assert len(results) == 5 and all(r != "returned" for r in results)
    assert '"agent stopped"' in agent.logs()


def test_sigterm_when_idle_exits_zero(agent):
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(20) == 0, agent.logs()
    assert '"agent stopped"' in agent.logs()
