"""Containers in the guest over gRPC: busybox rootfs in the shared directory, spec, stdio, wait."""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from pathlib import Path

import grpc

from agent.protocols import agent_pb2
from kata_agent_client.client import AgentClient
from kata_agent_client.bundle import make_rootfs
from kata_agent_client.spec import default_config, spec_from_config

GUEST_SHARED = "/run/kata-containers/shared/containers"
SHARE_TAG = "kataShared"
DNS = ["nameserver 10.0.2.3", "search vm.test"]


@contextlib.contextmanager
def agent_stub(addr: str):
    """A gRPC AgentService stub on a fresh channel to ``addr`` (any channel: serial://, tcp://),
    closed afterwards."""
    with AgentClient(addr, proto="grpc") as client:
        client.wait_ready(10)
        yield client.agent


@contextlib.contextmanager
def private_guest(tmp_path_factory, name: str, arch: str = "x86_64", **guest_kw):
    """A guest of a test module's own (its own QEMU devices), without virtio-fs, with the debug
    shell; skipped where QEMU cannot run; cleaned up afterwards."""
    import pytest

    from qemu.vm import Guest, qemu_binary
    from tests.vm.conftest import _ensure_image

    if qemu_binary(arch) is None:
        pytest.skip(f"qemu-system-{arch} is not installed: QEMU cannot run here")
    _ensure_image(arch)
    g = Guest(arch=arch, virtiofs=False, debug_console=True, run_dir=tmp_path_factory.mktemp(name) / "vm",
              name=f"test-{name}", boot_timeout=150, **guest_kw)
    g.start()
    try:
        yield g
    finally:
        g.cleanup()


def new_id(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def busybox_rootfs(cache: Path) -> Path:
    """One busybox rootfs per session on the host, copied per container."""
    root = cache / "busybox-rootfs"
    if not root.exists():
        make_rootfs(root)
    return root


def shared_storage() -> agent_pb2.Storage:
    return agent_pb2.Storage(driver="virtio-fs", source=SHARE_TAG, fstype="virtiofs",
                             mount_point=GUEST_SHARED)


def place_rootfs(share_dir: Path, template: Path, cid: str) -> str:
    """Copy the rootfs into the shared directory; returns the path the guest sees."""
    dest = Path(share_dir) / cid / "rootfs"
    shutil.copytree(template, dest, symlinks=True)
    return f"{GUEST_SHARED}/{cid}/rootfs"


def create(stub, cid: str, args: list[str], root_path: str, *, terminal: bool = False,
           hostname: str = "", mounts: list[dict] | None = None, storages=None, **cfg_extra):
    cfg = default_config(args, terminal=terminal)
    cfg["root"]["path"] = root_path
    if hostname:
        cfg["hostname"] = hostname
    else:
        cfg.pop("hostname")  # share the sandbox's UTS namespace name
    cfg["mounts"].extend(mounts or [])
    cfg.update(cfg_extra)
    req = agent_pb2.CreateContainerRequest(container_id=cid, exec_id=cid, OCI=spec_from_config(cfg),
                                           storages=storages or [])
    stub.CreateContainer(req, timeout=60)


def read_stream(stub, cid: str, exec_id: str = "", stream: str = "stdout", timeout: float = 30.0) -> bytes:
    """Everything until EOF (empty data); raises if EOF does not come within ``timeout``."""
    method = stub.ReadStdout if stream == "stdout" else stub.ReadStderr
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{stream} of {cid}/{exec_id}: no EOF within {timeout} s; got {out!r}")
        try:
            reply = method(agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=65536),
                           timeout=left)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"{stream} of {cid}/{exec_id}: no EOF within {timeout} s; got {out!r}") from e
            raise
        if not reply.data:
            return out
        out += reply.data


def wait(stub, cid: str, exec_id: str = "", timeout: float = 60.0) -> int:
    return stub.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id),
                            timeout=timeout).status


def run(stub, cid: str, args: list[str], root_path: str, **kw) -> tuple[int, str, str]:
    """create + start + wait + read + remove: (status, stdout, stderr)."""
    create(stub, cid, args, root_path, **kw)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        status = wait(stub, cid)
        out = read_stream(stub, cid).decode(errors="replace")
        err = read_stream(stub, cid, stream="stderr").decode(errors="replace")
        return status, out, err
    finally:
        remove(stub, cid)


def remove(stub, cid: str) -> None:
    """SIGKILL first, as Kata's runtime does before RemoveContainer (which kills at once anyway)."""
    try:
        stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id=cid, signal=9), timeout=10)
    except grpc.RpcError:
        pass
    try:
        stub.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid, timeout=10), timeout=30)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise


def read_until(stub, cid: str, needle: bytes, exec_id: str = "", timeout: float = 30.0) -> bytes:
    """Read stdout until ``needle`` shows up (the stream stays open)."""
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{needle!r} not seen on {cid}/{exec_id} stdout; got {out!r}")
        reply = stub.ReadStdout(agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=65536),
                                timeout=left)
        if not reply.data:
            raise AssertionError(f"EOF before {needle!r} on {cid}/{exec_id}; got {out!r}")
        out += reply.data
    return out
