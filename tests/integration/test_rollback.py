"""Fault injection: each step of CreateSandbox and of CreateContainer's preparation fails in turn
(KATA_AGENT_FAULT_INJECT); afterwards mounts, /run and the agent's children are exactly as before
and the ids can be used again."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.integration.test_sandbox import KATA, code_of, snapshot, spec_json

pytestmark = pytest.mark.timeout(120)

SANDBOX_STEPS = ["pin_namespaces", "sandbox_pidns", "dns", "kernel_modules", "sandbox_storages",
                 "guest_hooks"]
CONTAINER_STEPS = ["devices", "storages", "namespaces", "bundle"]


def settled(agent, expected, timeout: float = 3.0) -> tuple:
    """The snapshot, allowing a killed child a moment to be reaped."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(agent)
        if now == expected or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def full_sandbox(tmp_path) -> dict:
    hooks = tmp_path / "hooks" / "prestart"
    hooks.mkdir(parents=True, exist_ok=True)
    return {"hostname": "faulty", "sandbox_pidns": True, "dns": ["nameserver 192.0.2.1"],
            "guest_hook_path": str(tmp_path / "hooks"),
            "storages": [{"driver": "ephemeral", "mount_point": f"{KATA}/sandbox/eph"},
                         {"driver": "local", "mount_point": f"{KATA}/sandbox/a/b/local"}]}


@pytest.mark.parametrize("step", SANDBOX_STEPS)
def test_create_sandbox_step_fails(agent_factory, tmp_path, step):
    agent = agent_factory(env={"KATA_AGENT_FAULT_INJECT": step})
    before = snapshot(agent)
    for _ in range(2):  # and again: nothing was left that blocks a retry
        code, msg = code_of(agent, "CreateSandbox", full_sandbox(tmp_path))
        assert code == grpc.StatusCode.INTERNAL and msg == f"fault injected after step {step}"
        assert settled(agent, before) == before


@pytest.mark.parametrize("step", CONTAINER_STEPS)
def test_create_container_step_fails(agent_factory, tmp_path, busybox_rootfs, step):
    agent = agent_factory(env={"KATA_AGENT_FAULT_INJECT": step})
    agent.client.call("CreateSandbox", {"hostname": "ok", "sandbox_pidns": True})
    before = snapshot(agent)
    request = {"container_id": "faulty", "sandbox_pidns": True,
               "OCI": spec_json(busybox_rootfs, ["true"]),
               "storages": [{"driver": "ephemeral", "mount_point": f"{KATA}/shared/containers/faulty/vol"}]}
    for _ in range(2):  # the id is free again: the same injected failure, not ALREADY_EXISTS
        code, msg = code_of(agent, "CreateContainer", request)
        assert code == grpc.StatusCode.INTERNAL and msg == f"fault injected after step {step}"
        assert settled(agent, before) == before


def test_bad_input_at_each_container_step_changes_nothing(agent, busybox_rootfs):
    """Real bad inputs: a device that never comes, a storage that cannot mount, a bad rootfs."""
    agent.client.call("CreateSandbox", {"hostname": "ok"})
    before = snapshot(agent)
    good = {"driver": "ephemeral", "mount_point": f"{KATA}/shared/containers/c/vol"}
    cases = [
        ({"devices": [{"type": "blk", "vm_path": "/dev/nosuchdisk", "container_path": "/dev/x"}]},
         grpc.StatusCode.DEADLINE_EXCEEDED, "devices[0]"),
        ({"storages": [good, {"driver": "overlayfs", "options": [f"lowerdir={KATA}/missing"],
                              "mount_point": f"{KATA}/shared/containers/c/merged"}]},
         grpc.StatusCode.INVALID_ARGUMENT, "storages[1].options lowerdir"),
        ({"storages": [good], "OCI": spec_json("/nonexistent/rootfs", ["true"])},
         grpc.StatusCode.INVALID_ARGUMENT, "OCI.Root.Path"),
    ]
    for extra, want, prefix in cases:  # each fails after the steps before it did their work
        request = {"container_id": "c", "OCI": spec_json(busybox_rootfs, ["true"]), **extra}
        code, msg = code_of(agent, "CreateContainer", request)
        assert code == want and msg.startswith(prefix), msg
        assert settled(agent, before) == before
    agent.client.call("CreateContainer", {"container_id": "c", "OCI": spec_json(busybox_rootfs, ["true"]),
                                          "storages": [good]})
    agent.client.call("RemoveContainer", {"container_id": "c"})
    assert settled(agent, before) == before
