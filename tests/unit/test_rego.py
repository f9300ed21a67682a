"""Kata's Rego policy documents through regopy, with policies written for these tests in Kata's
style (tests/data/policies): allow all, all but ExecProcess, a CreateContainer field check."""

from __future__ import annotations

import pathlib

import pytest

from agent import policy, rego
from agent.errors import Code, FailedPrecondition, InvalidArgument, PermissionDenied
from agent.protocols import agent_pb2

pytest.importorskip("regopy", reason="regopy has glibc wheels for x86_64 only")

POLICIES = pathlib.Path(__file__).resolve().parents[1] / "data" / "policies"


def load(name: str) -> policy.Policy:
    return policy.parse((POLICIES / name).read_text(), name)


def create_request(args=("sh", "-c", "true"), caps=(), annotations=None) -> agent_pb2.CreateContainerRequest:
    req = agent_pb2.CreateContainerRequest(container_id="c1")
    req.OCI.Process.Args.extend(args)
    req.OCI.Process.Capabilities.Bounding.extend(caps)
    req.OCI.Annotations.update(annotations if annotations is not None else
                               {"io.katacontainers.pkg.oci.container_type": "pod_container"})
    return req


def test_allow_all_allows_every_method():
    p = load("allow-all.rego")
    for method, descriptor in policy.REQUEST_TYPES.items():
        request = getattr(agent_pb2, descriptor.name, None)
        p.check(method, request() if request is not None else None)


def test_all_but_exec_process():
    p = load("allow-all-except-exec-process.rego")
    p.check("CreateContainer", create_request())
    p.check("ReadStdout", agent_pb2.ReadStreamRequest(container_id="c1"))  # its rule is ReadStreamRequest
    with pytest.raises(PermissionDenied, match="ExecProcess: denied by policy rule 'ExecProcessRequest = false'"):
        p.check("ExecProcess", agent_pb2.ExecProcessRequest(container_id="c1", exec_id="e1"))


@pytest.mark.parametrize("request_,allowed", [
    (create_request(), True),
    (create_request(args=("ls",)), False),
    (create_request(caps=("CAP_CHOWN", "CAP_SYS_ADMIN")), False),
    (create_request(annotations={}), False),
])
def test_create_container_field_check(request_, allowed):
    decision = load("create-container-field.rego").decide("CreateContainer", request_)
    assert decision.allowed is allowed
    if not allowed:
        assert decision.rule == "CreateContainerRequest = false"


def test_an_undefined_rule_denies_and_allow_requests_failing_policy_allows():
    strict = policy.parse("package agent_policy\ndefault StartContainerRequest := true\n")
    strict.check("StartContainer", agent_pb2.StartContainerRequest())
    with pytest.raises(PermissionDenied, match=r"ExecProcessRequest \(not defined\)"):
        strict.check("ExecProcess", agent_pb2.ExecProcessRequest())
    lenient = policy.parse("package agent_policy\ndefault AllowRequestsFailingPolicy := true\n"
                           "default ExecProcessRequest := false\n")
    lenient.check("ExecProcess", agent_pb2.ExecProcessRequest())


def test_a_rule_may_answer_an_object_with_allowed():
    p = policy.parse('package agent_policy\nCreateContainerRequest := {"allowed": input.container_id == "ok", "ops": []}\n')
    assert p.decide("CreateContainer", agent_pb2.CreateContainerRequest(container_id="ok")).allowed
    assert not p.decide("CreateContainer", agent_pb2.CreateContainerRequest(container_id="no")).allowed


def test_input_is_the_request_as_kata_serializes_it():
    req = agent_pb2.CopyFileRequest(path="/x", file_size=1 << 40, uid=7, data=b"\x00\x01")
    got = rego.as_input(req)
    assert got["file_size"] == 1 << 40 and got["uid"] == 7 and got["gid"] == 0 and got["data"] == "AAE="
    got = rego.as_input(create_request())
    assert got["OCI"]["Process"]["Args"] == ["sh", "-c", "true"] and got["OCI"]["Root"] is None
    assert got["storages"] == [] and got["string_user"] is None
    p = policy.parse("package agent_policy\nimport future.keywords.if\n"
                     "CopyFileRequest if { input.file_size > 1099511627775 }\n")
    assert p.decide("CopyFile", req).allowed


@pytest.mark.parametrize("text,words", [
    ("package other\ndefault X := true\n", "must be 'package agent_policy'"),
    ("package agent_policy\nthis is not rego\n", "not a valid Rego module"),
])
def test_bad_documents_are_invalid_argument(text, words):
    with pytest.raises(InvalidArgument, match=words):
        policy.parse(text, "SetPolicy")


def test_no_engine_is_failed_precondition_naming_the_reason(monkeypatch):
    monkeypatch.setattr(rego, "engine_error", lambda: "regopy is not installed (aarch64 has musl wheels only)")
    with pytest.raises(FailedPrecondition) as err:
        policy.parse((POLICIES / "allow-all.rego").read_text(), "SetPolicy")
    assert err.value.code == Code.FAILED_PRECONDITION and "aarch64 has musl wheels only" in err.value.message


def test_json_rules_still_parse_and_can_govern_the_debug_console():
    p = policy.parse('{"rules": [{"name": "no-shell", "method": "DebugConsole", "action": "deny"}]}')
    assert not p.decide(policy.DEBUG_CONSOLE, None).allowed
    assert load("allow-all.rego").decide(policy.DEBUG_CONSOLE, None).allowed is False  # no rule: denied
    assert policy.parse("package agent_policy\ndefault DebugConsoleRequest := true\n").decide(
        policy.DEBUG_CONSOLE, None).allowed


def test_boot_policy_decides_the_debug_console(tmp_path):
    from agent.bootpolicy import BootPolicy
    from agent.init import debug_console_allowed

    def allowed(value: str) -> bool:
        return debug_console_allowed(BootPolicy(value))

    assert allowed("")  # no policy: as asked on the command line
    deny = tmp_path / "deny.json"
    deny.write_text('{"rules": [{"name": "no-shell", "method": "DebugConsole", "action": "deny"}]}')
    assert not allowed(str(deny))
    assert allowed(str(POLICIES / "allow-all-except-exec-process.rego")) is False  # no rule
    allow = tmp_path / "allow.rego"
    allow.write_text("package agent_policy\ndefault DebugConsoleRequest := true\n")
    assert allowed(str(allow))
    assert not allowed(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("document", [
    '{"rules": [{"name": "shell", "method": "DebugConsole", "action": "allow"}]}',
    '{"rules": [{"name": "no-shell", "method": "DebugConsole", "action": "deny"}]}',
    "package agent_policy\ndefault DebugConsoleRequest := true\n",
    '{"rules": "not a list"}',
], ids=["allowed", "denied", "rego", "invalid"])
def test_the_boot_policy_is_parsed_once_for_the_console_and_the_agent(tmp_path, monkeypatch, document):
    """PID 1's set-up asks the boot policy about the debug console, then the wiring makes it the
    agent's: one parse (it was read and parsed twice), the same policy object, the same error."""
    from agent import wiring
    from agent.bootpolicy import BootPolicy
    from agent.init import debug_console_allowed

    path = tmp_path / "policy"
    path.write_text(document)
    calls, parsed = [], []
    parse = policy.parse

    def counted(*args):
        calls.append(args)
        parsed.append(parse(*args))
        return parsed[-1]
    monkeypatch.setattr(policy, "parse", counted)
    boot = BootPolicy(str(path))
    allowed = debug_console_allowed(boot)
    if document.startswith('{"rules": "'):
        assert not allowed
        with pytest.raises(wiring.StartError, match="policy at boot: policy.rules: expected a list"):
            wiring.boot_policy(boot)
    else:
        assert allowed == ("no-shell" not in document)
        assert wiring.boot_policy(boot).current is parsed[0]
    assert len(calls) == 1


def test_a_rule_that_fails_to_evaluate_denies():
    p = policy.parse('package agent_policy\nCreateContainerRequest := x if { x := to_number("nope") }\n')
    decision = p.decide("CreateContainer", agent_pb2.CreateContainerRequest())
    assert not decision.allowed
