"""Shared pieces of the hostile-input tests: which methods may be fuzzed, how a reply is judged."""

from __future__ import annotations

import re

import grpc

from agent.protocols import agent_pb2

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
ALL_METHODS = tuple(m.name for m in SERVICE.methods)

# Requests that act on the whole machine even from inside the agent's namespaces (clock, CPUs and
# memory through sysfs, swap, the entropy pool, memory-agent knobs, block devices): never sent
# with a value that could parse into a valid request.
MACHINE_WIDE = frozenset({
    "SetGuestDateTime", "OnlineCPUMem", "MemHotplugByProbe", "AddSwap", "AddSwapPath",
    "ReseedRandomDev", "MemAgentMemcgSet", "MemAgentCompactSet", "ResizeVolume",
})
# A random policy can lock every later request out; it is fuzzed against its own agent.
OWN_AGENT = frozenset({"SetPolicy"})
FUZZABLE = tuple(m for m in ALL_METHODS if m not in MACHINE_WIDE | OWN_AGENT)

# "TypeError: ...", "KeyError: ...": an exception that escaped the handler's checks.
_PY_EXCEPTION = re.compile(r"^[A-Z][A-Za-z]*(Error|Exception|Exit|Interrupt)\b:")
# A call's deadline passed with no answer: grpcio's words, the ttrpc client's, the agent's ttrpc server's.
_NO_ANSWER = re.compile(r"^Deadline Exceeded$|: no reply within |: deadline of .* exceeded$")
# The agent tried to write outside its state root and containers (the harness made those read-only).
_EROFS = "Read-only file system"


def request_class(method: str):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)


def response_class(method: str):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(SERVICE.methods_by_name[method].output_type)


def scrub(msg) -> None:
    """Remove what would reach the machine whatever the namespaces: kernel modules to load."""
    for f, value in list(msg.ListFields()):
        if f.name == "kernel_modules":
            msg.ClearField(f.name)
        elif f.type == f.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry:
            for sub in (value if f.is_repeated else [value]):
                scrub(sub)


def timeout_for(method: str, default: float) -> float:
    return 1.0 if method in LONG_POLL else default


# Methods that wait for an event by design (Kata's long polls): no answer before the deadline is fine.
LONG_POLL = frozenset({"GetOOMEvent"})
# What grpcio's aio server answers itself when a body does not parse (before any agent code runs).
UNDECODABLE = re.compile(r"^Unexpected <class 'google\.protobuf\.message\.DecodeError'>")


def judge(method: str, err: grpc.RpcError | None, *, undecodable_ok: bool = True) -> str | None:
    """What is wrong with a reply, or None. ``err`` is None for an OK reply.

    ``undecodable_ok``: accept grpcio's own UNKNOWN reply to a body that does not parse (a known
    shortcoming, tested on its own in test_hostile_paths.py), so that raw fuzzing checks the rest.
    """
    if err is None:
        return None
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNKNOWN and undecodable_ok and UNDECODABLE.match(details):
        return None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and method in LONG_POLL:
        return None
    if code == grpc.StatusCode.UNKNOWN:
        return f"{method}: UNKNOWN status (an exception escaped): {details!r}"
    if not details.strip():
        return f"{method}: {code.name} without a message"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and _NO_ANSWER.search(details):
        return f"{method}: no answer before the client's deadline"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return f"{method}: {code.name}: {details!r} (agent gone or connection dropped)"
    if _EROFS in details:
        return f"{method}: tried to write outside its state root: {details!r}"
    if code == grpc.StatusCode.INTERNAL and _PY_EXCEPTION.match(details):
        return f"{method}: unhandled exception: {details[:300]!r}"
    return None
