"""protos/ against Kata's wire contract, and the generated modules against protos/."""

from __future__ import annotations

import importlib

import pytest
from google.protobuf import descriptor_pb2

from tests.protocol_contract import compile_protos, describe, differences, load_contract


@pytest.fixture(scope="module")
def compiled():
    return compile_protos()


def test_protos_match_the_kata_wire_contract(compiled):
    contract = load_contract()
    ours = describe(compiled)
    diffs = differences({k: contract[k] for k in ("messages", "enums", "services")}, ours)
    assert diffs == [], "protos/ differ from the contract:\n" + "\n".join(diffs)


def test_contract_has_every_method():
    services = load_contract()["services"]
    assert len(services["grpc.AgentService"]) == 42
    assert set(services["grpc.Health"]) == {"Check", "Version"}


def test_every_contract_method_has_a_handler():
    """A method without a handler would answer UNIMPLEMENTED (tests/unit/test_service.py); none of
    Kata's is left to that."""
    from agent import wiring

    assert sorted(set(load_contract()["services"]["grpc.AgentService"]) - set(wiring.all_handlers())) == []


def test_differences_reports_changes():
    # The comparison itself must see a renumbered, retyped, missing or extra field.
    a = {"messages": {"grpc.X": {"f": {"number": 1, "type": "string"}, "g": {"number": 2}}}}
    b = {"messages": {"grpc.X": {"f": {"number": 2, "type": "bytes"}, "h": {"number": 3}}}}
    diffs = differences(a, b)
    assert "messages.grpc.X.f.number: expected 1, got 2" in diffs
    assert "messages.grpc.X.f.type: expected 'string', got 'bytes'" in diffs
    assert "messages.grpc.X.g: missing" in diffs
    assert "messages.grpc.X.h: not in the contract" in diffs


def _all_messages(messages):
    for m in messages:
        yield m
        yield from _all_messages(m.nested_type)


@pytest.mark.parametrize("name", ["agent", "oci", "types", "health", "csi"])
def test_generated_code_is_current(compiled, name):
    fresh = next(f for f in compiled.file if f.name == f"{name}.proto")
    fresh.ClearField("source_code_info")
    # Generated modules embed descriptors without json_name (protoc derives it the same way).
    for msg in _all_messages(fresh.message_type):
        for field in msg.field:
            field.ClearField("json_name")
    module = importlib.import_module(f"agent.protocols.{name}_pb2")
    committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    assert committed == fresh, f"agent/protocols/{name}_pb2.py is stale: run python protos/generate.py"
