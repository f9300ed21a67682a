"""The policy over gRPC: loaded at boot, enforced before every RPC, replaced by SetPolicy."""

from __future__ import annotations

import base64
import json

import grpc
import pytest

DENY_LIST_ROUTES = {"rules": [{"name": "no-route-listing", "method": "ListRoutes", "action": "deny"}]}


def denied(client, method, request=None) -> str:
    with pytest.raises(grpc.RpcError) as err:
        client.call(method, request)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    return err.value.details()


def test_boot_policy_file_is_enforced(agent_factory, tmp_path):
    f = tmp_path / "policy.json"
    f.write_text(json.dumps(DENY_LIST_ROUTES))
    a = agent_factory(["--policy-file", str(f)])
    assert "'no-route-listing'" in denied(a.client, "ListRoutes")
    a.client.call("ListInterfaces")  # default allow
    assert '"allowed": false' in a.logs() and '"rule": "no-route-listing"' in a.logs()


def test_boot_policy_from_kernel_cmdline_base64(agent_factory, tmp_path):
    encoded = base64.b64encode(json.dumps({"default": "deny", "rules": [
        {"name": "health-ok", "method": ["GetGuestDetails", "SetPolicy"], "action": "allow"}]}).encode()).decode()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 agent.policy={encoded}\n")
    a = agent_factory(["--cmdline-file", str(cmdline)])
    a.client.call("GetGuestDetails")
    assert "'default'" in denied(a.client, "ListInterfaces")


def test_invalid_boot_policy_refuses_to_serve(agent_factory, tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"rules": [{"name": "x", "method": "NoSuchMethod", "action": "deny"}]}')
    with pytest.raises(RuntimeError, match="NoSuchMethod"):
        agent_factory(["--policy-file", str(f)])


def test_set_policy_replaces_and_invalid_keeps_the_old(agent):
    agent.client.call("ListRoutes")
    agent.client.call("SetPolicy", {"policy": json.dumps(DENY_LIST_ROUTES)})
    assert "'no-route-listing'" in denied(agent.client, "ListRoutes")
    with pytest.raises(grpc.RpcError) as err:
        agent.client.call("SetPolicy", {"policy": '{"rules": [{"name": "bad", "action": "deny"}]}'})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rule 'bad'.method" in err.value.details()
    assert "'no-route-listing'" in denied(agent.client, "ListRoutes")


def test_set_policy_is_itself_subject_to_the_policy(agent):
    lock = {"rules": [{"name": "locked", "method": "SetPolicy", "action": "deny"}]}
    agent.client.call("SetPolicy", {"policy": json.dumps(lock)})
    assert "'locked'" in denied(agent.client, "SetPolicy", {"policy": "{}"})


def test_predicate_on_request_field_over_grpc(agent):
    rule = {"rules": [{"name": "no-mem-probe", "method": "GetGuestDetails", "action": "deny",
                       "when": {"field": "mem_hotplug_probe", "equals": True}}]}
    agent.client.call("SetPolicy", {"policy": json.dumps(rule)})
    assert "'no-mem-probe'" in denied(agent.client, "GetGuestDetails", {"mem_hotplug_probe": True})
    assert agent.client.call("GetGuestDetails", {"mem_block_size": True}).agent_details.version


POLICIES = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "policies"


def test_kata_rego_policy_by_set_policy(agent, busybox_rootfs, container_id):
    """Kata's format over the wire: all but ExecProcess, then a CreateContainer field check."""
    pytest.importorskip("regopy", reason="regopy has glibc wheels for x86_64 only")
    from tests.integration.test_containers import create, make_spec

    agent.client.call("SetPolicy", {"policy": (POLICIES / "allow-all-except-exec-process.rego").read_text()})
    create(agent, container_id, make_spec(busybox_rootfs, ["sleep", "60"]))
    agent.client.call("StartContainer", {"container_id": container_id})
    assert "ExecProcessRequest = false" in denied(agent.client, "ExecProcess", {
        "container_id": container_id, "exec_id": "e1",
        "process": {"Args": ["true"], "Cwd": "/", "User": {}}})
    agent.client.call("RemoveContainer", {"container_id": container_id})

    agent.client.call("SetPolicy", {"policy": (POLICIES / "create-container-field.rego").read_text()})
    assert "CreateContainerRequest = false" in denied(
        agent.client, "CreateContainer", {"container_id": container_id, "OCI": _oci(busybox_rootfs, ["ls"])})
    assert "rule 'CreateContainerRequest = false'" in denied(
        agent.client, "CreateContainer", {"container_id": container_id, "OCI": _oci(busybox_rootfs, ["sh"], pod=False)})
    agent.client.call("CreateContainer", {"container_id": container_id, "OCI": _oci(busybox_rootfs, ["sh"])})
    agent.client.call("RemoveContainer", {"container_id": container_id})


def _oci(rootfs, args, pod=True):
    from tests.integration.test_containers import _json, make_spec

    cfg = make_spec(rootfs, args)
    if pod:
        cfg["annotations"] = {"io.katacontainers.pkg.oci.container_type": "pod_container"}
    return _json(cfg)


def test_kata_rego_policy_at_boot(agent_factory):
    pytest.importorskip("regopy", reason="regopy has glibc wheels for x86_64 only")
    a = agent_factory(["--policy-file", str(POLICIES / "allow-all-except-exec-process.rego")])
    a.client.call("ListRoutes")
    assert "ExecProcessRequest" in denied(a.client, "ExecProcess", {"container_id": "x", "exec_id": "y"})
