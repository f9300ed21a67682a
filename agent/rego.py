"""Kata's policy documents: Rego, ``package agent_policy``, evaluated by regopy (rego-cpp).

As Kata's agent does (src/agent/src/policy.rs), a call is allowed when the rule named after its
request type (``CreateContainerRequest``, ``ReadStreamRequest``, ...) evaluates, with the request
as ``input``, to ``true`` or to an object whose ``allowed`` is true (its ``ops``, Kata's policy
state patches, are not applied here). A rule the document does not define is a denial, unless the
document sets ``AllowRequestsFailingPolicy`` to true, which turns every denial into a logged
allowance (Kata's debugging switch). ``input`` is the request as Kata's agent serializes it:
field names as in the .proto (``container_id``, ``OCI``, ``Process``...), every field present
with its default, 64-bit integers as numbers, enums by name; bytes are base64 text.

regopy ships wheels for x86_64 with glibc; on aarch64 only musl ones, which this guest cannot
load: there a Rego document is refused with FAILED_PRECONDITION (``Unavailable``).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import threading
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from agent.errors import FailedPrecondition, InvalidArgument
from agent.policy import Decision, Policy

log = logging.getLogger(__name__)

PACKAGE = "agent_policy"
FAILING_SWITCH = "AllowRequestsFailingPolicy"
DEBUG_CONSOLE = "DebugConsole"  # agent.policy.DEBUG_CONSOLE: not an RPC, asked at boot


class Unavailable(FailedPrecondition):
    """No Rego engine on this guest: the message says why."""


def engine_error() -> str | None:
    """Why regopy cannot be used here, or None when it can."""
    # found, not imported: GetGuestDetails asks, and loading the native engine is for a policy
    if importlib.util.find_spec("regopy") is not None:
        return None
    return (f"Rego policies need regopy (rego-cpp), which is not installed on this {os.uname().machine} "
            f"guest (PyPI has glibc wheels for x86_64 only); use the JSON rules format")


def is_rego(text: str) -> bool:
    """A Rego document rather than JSON: its first statement is a package clause."""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line.startswith("package ")
    return False


class RegoPolicy:
    """Same interface as agent.policy.Policy: ``decide(method, request)`` and ``check``."""

    def __init__(self, text: str, source: str, request_types: dict[str, Any]) -> None:
        why = engine_error()
        if why is not None:
            raise Unavailable(f"{source}: {why}")
        from regopy import Interpreter, RegoError

        if not _package_of(text) == PACKAGE:
            raise InvalidArgument(f"{source}: a Rego policy must be 'package {PACKAGE}', as Kata's")
        self.source = source
        self.rules: list = []  # no JSON rules: for the "rules" count in logs
        self._request_types = request_types
        self._lock = threading.Lock()
        self._rego = Interpreter()
        try:
            self._rego.add_module("policy.rego", text)
            # compiled once, one entrypoint per rule the agent asks for (~0.3 ms a call, against
            # ~2 ms for a fresh query)
            rules = sorted({d.name for d in request_types.values()} | {FAILING_SWITCH, f"{DEBUG_CONSOLE}Request"})
            self._bundle = self._rego.build(None, [f"{PACKAGE}/{r}" for r in rules])
        except RegoError as exc:
            raise InvalidArgument(f"{source}: not a valid Rego module: {_first_error(exc)}") from None
        self.allow_failures = False
        try:
            self.allow_failures = self._query(FAILING_SWITCH, "{}") is True
        except InvalidArgument:
            pass
        if self.allow_failures:
            log.warning("policy: AllowRequestsFailingPolicy is set: denials are logged and allowed")

    def _query(self, rule: str, input_json: str) -> Any:
        """The rule's value, or None when it is undefined."""
        with self._lock:
            self._rego.set_input_term(input_json)
            out = self._rego.query_bundle_entrypoint(self._bundle, f"{PACKAGE}/{rule}")
        if not out.ok():
            raise InvalidArgument(f"{self.source}: evaluating {rule}: {str(out)[:500]}")
        text = str(out)
        if text == "undefined":
            return None
        return json.loads(text)["expressions"][0]

    check = Policy.check  # PERMISSION_DENIED naming the reason, the decision logged at debug level

    def decide(self, method: str, request: Message | None) -> Decision:
        """The rule named after the request type decides; Decision.rule says which, or why not."""
        # the request type's name, as Kata's agent; DebugConsole (not an RPC) asks DebugConsoleRequest
        rule = self._request_types[method].name if method in self._request_types else f"{method}Request"
        try:
            value = self._query(rule, json.dumps(as_input(request) if request is not None else {}))
        except InvalidArgument as exc:  # the rule failed to evaluate: a denial, as in Kata
            return Decision(self.allow_failures, f"{rule} failed: {exc.message}")
        if value is True or (isinstance(value, dict) and value.get("allowed") is True):
            return Decision(True, rule)
        reason = f"{rule} (not defined)" if value is None else f"{rule} = {json.dumps(value)[:200]}"
        if self.allow_failures:
            log.warning("policy: %s, allowed by AllowRequestsFailingPolicy", reason)
            return Decision(True, rule)
        return Decision(False, reason)


def _package_of(text: str) -> str:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line.removeprefix("package").strip() if line.startswith("package ") else ""
    return ""


def _first_error(exc: Exception) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "errormsg" in line:
            return line.strip().rstrip(")").split(":", 1)[-1]
    return text[:300]


# --- the request as Kata's agent gives it ----------------------------------------------------------

_INTS = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
         FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def as_input(message: Message) -> dict[str, Any]:
    """Every field by its .proto name, defaults included (as serde serializes Kata's structs)."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        mt = fd.message_type
        if fd.is_repeated and mt is not None and mt.GetOptions().map_entry:
            vfd = mt.fields_by_name["value"]
            out[fd.name] = {str(k): _value(vfd, v) for k, v in value.items()}
        elif fd.is_repeated:
            out[fd.name] = [_value(fd, v) for v in value]
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and not message.HasField(fd.name):
            out[fd.name] = None
        else:
            out[fd.name] = _value(fd, value)
    return out


def _value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return as_input(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        ev = fd.enum_type.values_by_number.get(value)
        return ev.name if ev is not None else value
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if fd.type in _INTS:
        return int(value)
    return value
