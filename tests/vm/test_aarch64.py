"""A container's whole life in the aarch64 guest (TCG): create, start, stdout, exec, wait, remove.

The rootfs is made in the guest from its own (arm64) static busybox, so the test needs no
foreign binaries on the host and no shared directory.
"""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from agent.protocols import agent_pb2, oci_pb2
from kata_agent_client.spec import DEFAULT_ENV
from tests.vm import helpers as h

APPLETS = ("sh", "echo", "cat", "sleep", "uname", "true")


@pytest.fixture(scope="module")
def arm(guest_for):
    if "aarch64" not in os.environ.get("KATA_VM_ARCHES", "x86_64,aarch64").split(","):
        pytest.skip("aarch64 not in KATA_VM_ARCHES")
    return guest_for("aarch64")


def _rootfs(g, cid: str) -> str:
    root = f"/run/kata-containers/shared/containers/{cid}/rootfs"
    links = " ".join(f"ln -s busybox {root}/bin/{a};" for a in APPLETS)
    rc, out = g.shell(f"mkdir -p {root}/bin {root}/proc {root}/dev {root}/sys {root}/tmp && "
                      f"cp /bin/busybox {root}/bin/busybox && {links} echo ok")
    assert rc == 0 and "ok" in out, out
    return root


def test_container_life_on_aarch64(arm):
    cid = h.new_id("arm")
    with h.agent_stub(arm.addr) as stub:
        stub.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="arm", sandbox_id="arm"), timeout=60)
        try:
            root = _rootfs(arm, cid)
            h.create(stub, cid, ["sh", "-c", "echo hello from $(uname -m); exec sleep 600"], root)
            stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
            assert h.read_until(stub, cid, b"\n") == b"hello from aarch64\n"

            proc = oci_pb2.Process(Args=["sh", "-c", "echo exec says hi; exit 3"], Env=DEFAULT_ENV, Cwd="/",
                                   User=oci_pb2.User(UID=0, GID=0))
            stub.ExecProcess(agent_pb2.ExecProcessRequest(container_id=cid, exec_id="e1", process=proc), timeout=30)
            assert h.wait(stub, cid, "e1") == 3
            assert h.read_stream(stub, cid, "e1") == b"exec says hi\n"

            stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id=cid, signal=signal.SIGKILL), timeout=10)
            assert h.wait(stub, cid) == 137
            stub.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid, timeout=10), timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                stub.StatsContainer(agent_pb2.StatsContainerRequest(container_id=cid), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            h.remove(stub, cid)
            stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)


def test_user_namespace_on_aarch64(arm):
    """A container with its ids mapped in the sandbox: the mount API calls (fsopen, fsmount,
    move_mount: the mqueue of the sandbox's IPC namespace) and the maps on the other arch."""
    cid = h.new_id("armu")
    linux = h.default_config(["true"])["linux"]
    linux["namespaces"] = [*linux["namespaces"], {"type": "user"}]
    linux["uidMappings"] = linux["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    with h.agent_stub(arm.addr) as stub:
        stub.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="arm", sandbox_id="arm"), timeout=60)
        try:
            root = _rootfs(arm, cid)
            status, out, err = h.run(stub, cid, ["sh", "-c", "cat /proc/self/uid_map /proc/self/mountinfo; "
                                                 "echo x > /dev/null && echo null-ok"], root, linux=linux)
            assert status == 0, (out, err)
            lines = out.splitlines()
            assert lines[0].split() == ["0", "100000", "65536"] and lines[-1] == "null-ok", out
            assert any(" /dev/mqueue " in line and " - mqueue " in line for line in lines), out
        finally:
            stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
