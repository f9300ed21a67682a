"""The policy language: every predicate kind allows and denies, and bad documents are refused."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from agent import policy
from agent.errors import InvalidArgument, PermissionDenied
from agent.protocols import agent_pb2, oci_pb2, types_pb2


def deny_when(method: str, when: dict, name: str = "r") -> policy.Policy:
    return policy.parse(json.dumps({"rules": [{"name": name, "method": method, "action": "deny",
                                               "when": when}]}))


def exec_request(caps=(), uid=0, cid="c1", env=()) -> agent_pb2.ExecProcessRequest:
    proc = oci_pb2.Process(Args=["sh"], Env=list(env))
    proc.User.UID = uid
    proc.Capabilities.Bounding.extend(caps)
    return agent_pb2.ExecProcessRequest(container_id=cid, exec_id="e1", process=proc)


# One case per predicate kind: (when, a request it denies, a request it allows).
KIND_CASES = {
    "equals": ({"field": "process.User.UID", "equals": 0}, exec_request(uid=0), exec_request(uid=1000)),
    "not_equals": ({"field": "container_id", "not_equals": "trusted"},
                   exec_request(cid="other"), exec_request(cid="trusted")),
    "in": ({"field": "container_id", "in": ["a", "b"]}, exec_request(cid="b"), exec_request(cid="c")),
    "contains": ({"field": "process.Capabilities.Bounding", "contains": "CAP_SYS_ADMIN"},
                 exec_request(caps=["CAP_CHOWN", "CAP_SYS_ADMIN"]), exec_request(caps=["CAP_CHOWN"])),
    "matches": ({"field": "process.Env", "matches": r"LD_PRELOAD=.*"},
                exec_request(env=["A=1", "LD_PRELOAD=/x.so"]), exec_request(env=["A=LD_PRELOAD=1"])),
    "prefix": ({"field": "exec_id", "prefix": "e"}, exec_request(),
               agent_pb2.ExecProcessRequest(exec_id="x1")),
    "exists": ({"field": "process.Capabilities.Bounding", "exists": True},
               exec_request(caps=["CAP_KILL"]), exec_request()),
}


@pytest.mark.parametrize("kind", sorted(KIND_CASES))
def test_each_kind_denies_what_it_matches(kind):
    when, denied, _ = KIND_CASES[kind]
    p = deny_when("ExecProcess", when, name=f"no-{kind}")
    with pytest.raises(PermissionDenied, match=f"no-{kind}"):
        p.check("ExecProcess", denied)


@pytest.mark.parametrize("kind", sorted(KIND_CASES))
def test_each_kind_allows_what_it_does_not_match(kind):
    when, _, allowed = KIND_CASES[kind]
    p = deny_when("ExecProcess", when)
    p.check("ExecProcess", allowed)
    assert p.decide("ExecProcess", allowed) == policy.Decision(True, "default")


def test_exists_false_denies_unset_field():
    p = deny_when("ExecProcess", {"field": "process.Cwd", "exists": False})
    assert not p.decide("ExecProcess", exec_request()).allowed
    req = exec_request()
    req.process.Cwd = "/"
    assert p.decide("ExecProcess", req).allowed


def test_rule_applies_only_to_its_method():
    p = deny_when("ExecProcess", {"field": "container_id", "equals": "c1"})
    assert p.decide("SignalProcess", agent_pb2.SignalProcessRequest(container_id="c1")).allowed


def test_first_matching_rule_wins_and_default_deny():
    doc = {"default": "deny", "rules": [
        {"name": "allow-c1", "method": ["ExecProcess", "SignalProcess"], "action": "allow",
         "when": {"field": "container_id", "equals": "c1"}},
        {"name": "deny-all-exec", "method": "ExecProcess", "action": "deny"}]}
    p = policy.parse(json.dumps(doc))
    assert p.decide("ExecProcess", exec_request(cid="c1")) == policy.Decision(True, "allow-c1")
    assert p.decide("ExecProcess", exec_request(cid="c2")) == policy.Decision(False, "deny-all-exec")
    assert p.decide("ListRoutes", agent_pb2.ListRoutesRequest()) == policy.Decision(False, "default")


def test_combinators():
    when = {"all": [{"field": "process.User.UID", "equals": 0},
                    {"any": [{"field": "container_id", "prefix": "untrusted-"},
                             {"not": {"field": "process.Terminal", "equals": False}}]}]}
    p = deny_when("ExecProcess", when)
    assert not p.decide("ExecProcess", exec_request(uid=0, cid="untrusted-1")).allowed
    assert p.decide("ExecProcess", exec_request(uid=0, cid="ok")).allowed
    tty = exec_request(uid=0, cid="ok")
    tty.process.Terminal = True
    assert not p.decide("ExecProcess", tty).allowed
    assert p.decide("ExecProcess", exec_request(uid=5, cid="untrusted-1")).allowed


def test_repeated_messages_fan_out_and_enums_compare_by_name():
    p = deny_when("UpdateRoutes", {"field": "routes.Routes.family", "equals": "v6"})
    req = agent_pb2.UpdateRoutesRequest()
    req.routes.Routes.add(dest="10.0.0.0/8")
    assert p.decide("UpdateRoutes", req).allowed
    req.routes.Routes.add(dest="fd00::/64", family=types_pb2.v6)
    assert not p.decide("UpdateRoutes", req).allowed


def test_map_keys_as_list_path():
    p = deny_when("CreateContainer", {"field": ["OCI", "Annotations", "io.example.priv"],
                                      "equals": "true"})
    req = agent_pb2.CreateContainerRequest()
    assert p.decide("CreateContainer", req).allowed
    req.OCI.Annotations["io.example.priv"] = "true"
    assert not p.decide("CreateContainer", req).allowed
    keyed = deny_when("CreateContainer", {"field": "OCI.Annotations", "contains": "io.example.priv"})
    assert not keyed.decide("CreateContainer", req).allowed


def test_wildcard_method_and_rule_without_when():
    p = policy.parse(json.dumps({"rules": [{"name": "lockdown", "method": "*", "action": "deny"}]}))
    with pytest.raises(PermissionDenied, match="'lockdown'"):
        p.check("ListInterfaces", agent_pb2.ListInterfacesRequest())


@pytest.mark.parametrize("doc, names", [
    ("not json", "not a JSON document"),
    ("[]", "expected a JSON object"),
    ({"default": "maybe"}, "policy.default"),
    ({"rules": [{"method": "ExecProcess", "action": "deny"}]}, "policy.rules[0].name"),
    ({"rules": [{"name": "x", "method": "NoSuch", "action": "deny"}]}, "rule 'x'.method: 'NoSuch'"),
    ({"rules": [{"name": "x", "method": "ExecProcess", "action": "drop"}]}, "rule 'x'.action"),
    ({"rules": [{"name": "x", "method": "ExecProcess", "action": "deny",
                 "when": {"field": "process.Nope", "equals": 1}}]}, "has no field 'process.Nope'"),
    ({"rules": [{"name": "x", "method": "ExecProcess", "action": "deny",
                 "when": {"field": "exec_id", "matches": "("}}]}, "rule 'x'.when.matches: bad regular"),
    ({"rules": [{"name": "x", "method": "ExecProcess", "action": "deny",
                 "when": {"field": "exec_id", "equals": 1, "prefix": "a"}}]}, "exactly one of"),
    ({"rules": [{"name": "x", "method": "ExecProcess", "action": "deny",
                 "when": {"field": "exec_id", "in": "a"}}]}, "rule 'x'.when.in: a list"),
    ({"rules": [{"name": "x", "method": "ExecProcess", "action": "deny",
                 "when": {"all": []}}]}, "rule 'x'.when.all"),
    ({"rules": [{"name": "x", "method": "*", "action": "deny"},
                {"name": "x", "method": "*", "action": "allow"}]}, "'x' used twice"),
    ({"rules": [{"name": "x", "method": "*", "action": "deny", "unless": {}}]}, "unknown key 'unless'"),
])
def test_invalid_documents_name_the_problem(doc, names):
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(InvalidArgument) as err:
        policy.parse(text)
    assert names in err.value.message


def test_holder_keeps_old_policy_on_invalid_replacement():
    holder = policy.PolicyHolder()
    holder.replace(json.dumps({"default": "deny"}))
    with pytest.raises(InvalidArgument):
        holder.replace("{bad")
    with pytest.raises(PermissionDenied, match="'default'"):
        holder.check("ListRoutes", agent_pb2.ListRoutesRequest())


def test_every_decision_is_logged_at_debug(caplog):
    p = deny_when("ExecProcess", {"field": "container_id", "equals": "bad"}, name="no-bad")
    with caplog.at_level(logging.DEBUG, logger="agent.policy"):
        p.check("ExecProcess", exec_request(cid="good"))
        with pytest.raises(PermissionDenied):
            p.check("ExecProcess", exec_request(cid="bad"))
    fields = [r.fields for r in caplog.records if r.levelno == logging.DEBUG]
    assert fields == [{"method": "ExecProcess", "allowed": True, "rule": "default"},
                      {"method": "ExecProcess", "allowed": False, "rule": "no-bad"}]


def test_load_source_base64_and_path(tmp_path):
    doc = '{"default": "deny"}'
    assert policy.load_source(base64.b64encode(doc.encode()).decode())[0] == doc
    f = tmp_path / "p.json"
    f.write_text(doc)
    assert policy.load_source(str(f)) == (doc, str(f))
    with pytest.raises(InvalidArgument, match="agent.policy"):
        policy.load_source("not*base64")
