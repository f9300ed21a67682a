"""The RPC policy: before every call, a document decides allow or deny.

Two formats: Kata's Rego documents (``package agent_policy``, one rule per request type; see
agent.rego), and this agent's JSON rules, which need no native engine (so they work on aarch64
guests, where regopy cannot be installed) and are checked against the request types when loaded.

JSON document::

    {"default": "allow",                      # or "deny"; "allow" when absent
     "rules": [
       {"name": "no-sys-admin-exec",           # reported in PERMISSION_DENIED and in logs
        "method": "ExecProcess",               # a method, a list of methods, or "*"
        "action": "deny",                      # or "allow"
        "when": {"field": "process.Capabilities.Bounding", "contains": "CAP_SYS_ADMIN"}}]}

The first rule whose method matches and whose ``when`` holds (a rule without ``when`` always holds)
decides; when none does, ``default`` decides.

A predicate is ``{"field": PATH, KIND: VALUE}`` with exactly one KIND:

- ``equals`` / ``not_equals``: a value of the field is / no value of the field is VALUE;
- ``in``: a value of the field is one of the list VALUE;
- ``contains``: a value (a list, a map's keys or a string) contains VALUE;
- ``matches``: a value (a string, or an element of a list) matches the regex VALUE in full;
- ``prefix``: a value (a string, or an element of a list) starts with VALUE;
- ``exists``: the field is set (non-empty, non-default) when VALUE is true, unset when false;

or a combination ``{"all": [...]}``, ``{"any": [...]}``, ``{"not": PREDICATE}``.

PATH names request fields with dots (``"process.User.UID"``) or as a list of names, where a name
after a map field is a key (``["OCI", "Annotations", "io.katacontainers.pkg"]``). Crossing a repeated
message field visits every element, so a path can have several values; enums compare by name.
Paths are checked against the method's request type when the policy is loaded.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from agent.errors import InvalidArgument, PermissionDenied
from agent.protocols import agent_pb2

log = logging.getLogger(__name__)

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
REQUEST_TYPES: dict[str, Descriptor] = {m.name: m.input_type for m in SERVICE.methods}
# Not an RPC: asked once at boot before the debug console starts (agent.init); no request fields.
DEBUG_CONSOLE = "DebugConsole"
PSEUDO_TYPES: dict[str, Descriptor] = {DEBUG_CONSOLE: empty_pb2.Empty.DESCRIPTOR}
ACTIONS = ("allow", "deny")
KINDS = ("equals", "not_equals", "in", "contains", "matches", "prefix", "exists")
MAX_DOCUMENT = 1 << 20

Predicate = Callable[[Message], bool]


class PolicyError(InvalidArgument):
    """A policy document that cannot be used; the message names the rule and field."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # the deciding rule's name, or "default"


@dataclass
class Rule:
    name: str
    methods: frozenset[str] | None  # None: every method
    allow: bool
    when: Predicate | None = None

    def applies(self, method: str, request: Message) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.when is None or self.when(request)


@dataclass
class Policy:
    default_allow: bool = True
    rules: list[Rule] = field(default_factory=list)
    source: str = "built-in allow-all"

    def decide(self, method: str, request: Message) -> Decision:
        for rule in self.rules:
            if rule.applies(method, request):
                return Decision(rule.allow, rule.name)
        return Decision(self.default_allow, "default")

    def check(self, method: str, request: Message) -> None:
        """Raise PermissionDenied naming the rule when ``method`` with ``request`` is denied."""
        decision = self.decide(method, request)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("policy decision", extra={"fields": {
                "method": method, "allowed": decision.allowed, "rule": decision.rule}})
        if not decision.allowed:
            raise PermissionDenied(f"{method}: denied by policy rule {decision.rule!r}")


class PolicyHolder:
    """The agent's current policy; ``replace`` swaps it only when the new document is valid."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.current = policy or Policy()

    def check(self, method: str, request: Message) -> None:
        self.current.check(method, request)

    def replace(self, text: str, source: str = "SetPolicy") -> Policy:
        self.current = parse(text, source)
        log.info("policy replaced", extra={"fields": {"source": source, "rules": len(self.current.rules)}})
        return self.current


# --- parsing -------------------------------------------------------------------------------------


def parse(text: str, source: str = "policy") -> Policy:
    """A Policy from a JSON document, or Kata's Rego (agent.rego.RegoPolicy, same interface); an
    error names what is wrong: PolicyError, or rego.Unavailable (FAILED_PRECONDITION) where this
    guest has no Rego engine."""
    if len(text) > MAX_DOCUMENT:
        raise PolicyError(f"policy: larger than {MAX_DOCUMENT} bytes")
    from agent import rego

    if rego.is_rego(text):
        return rego.RegoPolicy(text, source, REQUEST_TYPES)  # type: ignore[return-value]
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"policy: not a JSON document: {exc}") from None
    if not isinstance(doc, dict):
        raise PolicyError("policy: expected a JSON object with 'default' and 'rules'")
    _only_keys(doc, {"default", "rules", "version"}, "policy")
    default = doc.get("default", "allow")
    if default not in ACTIONS:
        raise PolicyError(f"policy.default: {default!r} must be 'allow' or 'deny'")
    rules = doc.get("rules", [])
    if not isinstance(rules, list):
        raise PolicyError("policy.rules: expected a list")
    parsed = [_rule(r, i) for i, r in enumerate(rules)]
    names = [r.name for r in parsed]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise PolicyError(f"policy.rules: rule name {dup!r} used twice")
    return Policy(default == "allow", parsed, source)


def load_source(value: str) -> tuple[str, str]:
    """The policy text for a boot setting: a file path, or the document in base64."""
    if value.startswith("/") or os.path.exists(value):
        with open(value, encoding="utf-8") as f:
            return f.read(MAX_DOCUMENT + 1), value
    try:
        return base64.b64decode(value, validate=True).decode("utf-8"), "agent.policy (base64)"
    except (binascii.Error, UnicodeDecodeError):
        raise PolicyError("agent.policy: neither an absolute path nor base64 of a policy document") from None


def _only_keys(obj: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise PolicyError(f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _rule(obj: Any, index: int) -> Rule:
    where = f"policy.rules[{index}]"
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: expected an object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}.name: a non-empty string is required")
    where = f"rule {name!r}"
    _only_keys(obj, {"name", "method", "action", "when"}, where)
    action = obj.get("action")
    if action not in ACTIONS:
        raise PolicyError(f"{where}.action: {action!r} must be 'allow' or 'deny'")
    methods = _methods(obj.get("method"), where)
    types = [{**REQUEST_TYPES, **PSEUDO_TYPES}[m] for m in methods] if methods is not None else None
    when = _predicate(obj["when"], types, f"{where}.when") if "when" in obj else None
    return Rule(name, methods, action == "allow", when)


def _methods(value: Any, where: str) -> frozenset[str] | None:
    if value == "*":
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise PolicyError(f"{where}.method: a method name, a list of names or '*' is required")
    for n in names:
        if n not in REQUEST_TYPES and n not in PSEUDO_TYPES:
            raise PolicyError(f"{where}.method: {n!r} is not an AgentService method (nor {DEBUG_CONSOLE!r})")
    return frozenset(names)


def _predicate(obj: Any, types: list[Descriptor] | None, where: str) -> Predicate:
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: expected an object")
    for combinator in ("all", "any"):
        if combinator in obj:
            _only_keys(obj, {combinator}, where)
            items = obj[combinator]
            if not isinstance(items, list) or not items:
                raise PolicyError(f"{where}.{combinator}: a non-empty list is required")
            preds = [_predicate(p, types, f"{where}.{combinator}[{i}]") for i, p in enumerate(items)]
            if combinator == "all":
                return lambda req: all(p(req) for p in preds)
            return lambda req: any(p(req) for p in preds)
    if "not" in obj:
        _only_keys(obj, {"not"}, where)
        inner = _predicate(obj["not"], types, f"{where}.not")
        return lambda req: not inner(req)
    return _field_predicate(obj, types, where)


def _field_predicate(obj: dict, types: list[Descriptor] | None, where: str) -> Predicate:
    _only_keys(obj, {"field", *KINDS}, where)
    kinds = [k for k in KINDS if k in obj]
    if len(kinds) != 1:
        raise PolicyError(f"{where}: exactly one of {', '.join(KINDS)} is required")
    kind, expected = kinds[0], obj[kinds[0]]
    path = _path(obj.get("field"), where)
    for descriptor in types or ():
        _check_path(descriptor, path, f"{where}.field")
    test = _test(kind, expected, f"{where}.{kind}")
    return lambda req: test(resolve(req, path))


def _path(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) and value:
        parts = tuple(value.split("."))
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        parts = tuple(value)
    else:
        raise PolicyError(f"{where}.field: a dotted path or a list of names is required")
    if any(not p for p in parts):
        raise PolicyError(f"{where}.field: {value!r} has an empty name")
    return parts


def _check_path(descriptor: Descriptor, path: tuple[str, ...], where: str) -> None:
    """Every name in ``path`` is a field of the message it crosses (map keys are free)."""
    current: Descriptor | None = descriptor
    for i, name in enumerate(path):
        if current is None:
            raise PolicyError(f"{where}: {'.'.join(path)!r}: {path[i - 1]!r} is not a message")
        fd = current.fields_by_name.get(name)
        if fd is None:
            raise PolicyError(f"{where}: {'.'.join(path)!r}: {descriptor.name} has no field "
                              f"{'.'.join(path[:i + 1])!r}")
        if _is_map(fd):
            return  # the rest of the path is a key
        current = fd.message_type if fd.type == FieldDescriptor.TYPE_MESSAGE else None


def _test(kind: str, expected: Any, where: str) -> Callable[[list[Any]], bool]:
    """A test on the list of values a path resolved to."""
    if kind == "exists":
        if not isinstance(expected, bool):
            raise PolicyError(f"{where}: true or false is required")
        return lambda values: any(_is_set(v) for v in values) == expected
    if kind == "equals":
        return lambda values: any(v == expected for v in values)
    if kind == "not_equals":
        return lambda values: all(v != expected for v in values)
    if kind == "in":
        if not isinstance(expected, list):
            raise PolicyError(f"{where}: a list is required")
        return lambda values: any(_hashable(v) in expected for v in values)
    if kind == "contains":
        return lambda values: any(_contains(v, expected) for v in values)
    if not isinstance(expected, str):
        raise PolicyError(f"{where}: a string is required")
    if kind == "prefix":
        return lambda values: any(s.startswith(expected) for s in _strings(values))
    try:
        regex = re.compile(expected)
    except re.error as exc:
        raise PolicyError(f"{where}: bad regular expression {expected!r}: {exc}") from None
    return lambda values: any(regex.fullmatch(s) for s in _strings(values))


# --- evaluation ----------------------------------------------------------------------------------


def resolve(message: Message, path: Iterable[str]) -> list[Any]:
    """The values at ``path`` in ``message``: plain Python values (lists, dicts, enum names)."""
    values: list[Any] = [message]
    for name in path:
        values = [v for value in values for v in _step(value, name)]
    return [_plain(v) for v in values]


def _step(value: Any, name: str) -> list[Any]:
    if isinstance(value, Message):
        fd = value.DESCRIPTOR.fields_by_name.get(name)
        if fd is None:
            return []
        got = getattr(value, name)
        if _is_map(fd):
            return [(fd, got)]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            return list(got) if fd.is_repeated else [got]
        return [(fd, got)]
    if isinstance(value, tuple):  # a (field, value) pair: only maps have named children
        fd, got = value
        if _is_map(fd) and name in got:
            return [got[name]]
        return []
    if isinstance(value, dict):
        return [value[name]] if name in value else []
    return []


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        fd, got = value
        if _is_map(fd):
            return {k: _plain(v) for k, v in got.items()}
        if fd.is_repeated:
            return [_enum_name(fd, v) for v in got]
        return _enum_name(fd, got)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _enum_name(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_ENUM:
        ev = fd.enum_type.values_by_number.get(value)
        return ev.name if ev is not None else value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _is_map(fd: FieldDescriptor) -> bool:
    mt = fd.message_type
    return fd.is_repeated and mt is not None and mt.GetOptions().map_entry


def _is_set(value: Any) -> bool:
    if isinstance(value, Message):
        return value.ByteSize() > 0
    return value not in (None, "", 0, False, [], {})


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _contains(value: Any, expected: Any) -> bool:
    if isinstance(value, str):
        return isinstance(expected, str) and expected in value
    if isinstance(value, (list, dict)):
        return expected in value
    return False


def _strings(values: list[Any]) -> Iterable[str]:
    for v in values:
        if isinstance(v, str):
            yield v
        elif isinstance(v, list):
            yield from (s for s in v if isinstance(s, str))
