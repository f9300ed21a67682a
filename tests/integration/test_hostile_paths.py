"""Path attacks, one by one, against a confined agent (tests/reliability/isolated.py).

Each hostile request must be refused with a clear status naming the field, or be contained (what
it does stays inside the container or /run/kata-containers); afterwards the agent's mounts, fds,
children and cgroups are as before, a canary directory outside is untouched, and the machine is
unchanged. The canary lives in the agent's writable work directory, so a path that escaped would
really land there.
"""

from __future__ import annotations

import os
import pathlib
import uuid

import grpc
import pytest

from agent.protocols import agent_pb2
from tests.support import make_busybox_rootfs
from tests.reliability.containers import create, run, spec, status_of
from tests.reliability.hostile import SERVICE
from tests.reliability.invariants import AgentState, Checkpoint, MachineState, tree_hash
from tests.reliability.isolated import IsolatedAgent

pytestmark = pytest.mark.timeout(120)

BAD_IDS = ["", "a/b", "..", "../x", "/abs", "a\x00b", "x" * 129, ".hidden", "-dash", "a b", "é"]
SHARED = "/run/kata-containers/shared/containers"
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class World:
    def __init__(self, work: pathlib.Path) -> None:
        self.work = work
        self.agent = IsolatedAgent(work / "agent")
        self.client = self.agent.client
        self.rootfs = make_busybox_rootfs(self.agent.work / "rootfs")
        self.canary = self.agent.work / "canary"
        (self.canary / "etc").mkdir(parents=True)
        (self.canary / "etc" / "passwd").write_text("canary\n")
        self.machine = MachineState.take()

    def agent_path(self, path: str) -> pathlib.Path:
        """``path`` as the agent sees it (its /run is its own tmpfs)."""
        return pathlib.Path(f"/proc/{self.agent.pid}/root") / path.lstrip("/")

    def fresh_rootfs(self) -> pathlib.Path:
        return make_busybox_rootfs(self.agent.work / f"rootfs-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("hostile"))
    yield w
    rc = w.agent.stop()
    assert rc == 0, w.agent.logs()[-3000:]
    assert not w.machine.diff(MachineState.take())


@pytest.fixture
def clean(world):
    """Snapshot before the test; after it, everything is back and the canary untouched."""
    world.client.health()
    checkpoint = Checkpoint(world.agent, world.machine)
    canary = tree_hash(str(world.canary))
    yield world
    checkpoint.assert_back()
    assert tree_hash(str(world.canary)) == canary, "the canary directory outside was changed"


def _id_requests(bad: str):
    yield "container_id", "StartContainer", {"container_id": bad}
    yield "container_id", "RemoveContainer", {"container_id": bad}
    yield "container_id", "WaitProcess", {"container_id": bad}
    yield "container_id", "SignalProcess", {"container_id": bad, "signal": 9}
    yield "container_id", "ReadStdout", {"container_id": bad, "len": 10}
    yield "container_id", "WriteStdin", {"container_id": bad}
    yield "container_id", "StatsContainer", {"container_id": bad}
    yield "container_id", "PauseContainer", {"container_id": bad}
    yield "container_id", "UpdateContainer", {"container_id": bad}
    yield "container_id", "ExecProcess", {"container_id": bad, "exec_id": "e1", "process": {"Args": ["true"]}}


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_ids_are_refused_everywhere(clean, bad):
    w = clean
    code, msg = status_of(create, w.client, bad, spec(w.rootfs, ["true"]))
    assert (code, "container_id" in msg) == (INVALID, True), (code, msg)
    for field, method, req in _id_requests(bad):
        req = _request(method, req)
        code, msg = status_of(w.client.call, method, req)
        assert code == INVALID and field in msg, (method, code, msg)
    # an exec id is a path component too
    cid = "ids-" + uuid.uuid4().hex[:6]
    create(w.client, cid, spec(w.rootfs, ["sleep", "30"]))
    try:
        if bad:
            code, msg = status_of(w.client.call, "ExecProcess", _request("ExecProcess", {
                "container_id": cid, "exec_id": bad, "process": {"Args": ["true"], "Cwd": "/"}}))
            assert code == INVALID and "exec_id" in msg, (code, msg)
    finally:
        w.client.call("RemoveContainer", {"container_id": cid, "timeout": 5})


def _request(method: str, fields: dict):
    """A request message set field by field (JSON parsing would refuse a NUL in a string)."""
    from google.protobuf import json_format

    cls = __import__("kata_agent_client").AgentClient.request_type(method)
    msg = cls()
    nested = {k: v for k, v in fields.items() if isinstance(v, dict)}
    json_format.ParseDict(nested, msg)
    for k, v in fields.items():
        if not isinstance(v, dict):
            setattr(msg, k, v)
    return msg


@pytest.mark.parametrize("mount_point", [
    "/etc/evil", "/run/kata-containers/../../etc/evil", f"{SHARED}/../../../../tmp/evil",
    "/run/kata-containers", "relative/x", "/run/kata-containers/a\x00b", "/run/kata-containersX/y",
    "/proc/self/evil",
], ids=repr)
@pytest.mark.parametrize("driver", ["local", "ephemeral"])
def test_storage_mount_point_outside_is_refused(clean, driver, mount_point):
    w = clean
    sandbox = agent_pb2.CreateSandboxRequest(hostname="h", sandbox_id="sb1")
    sandbox.storages.add(driver=driver, source="tmpfs" if driver == "ephemeral" else "local",
                         fstype="tmpfs" if driver == "ephemeral" else "local", mount_point=mount_point)
    code, msg = status_of(w.client.call, "CreateSandbox", sandbox)
    assert code == INVALID and "mount_point" in msg, (code, msg)
    # nothing half-made: a clean sandbox can be created and destroyed right after
    w.client.call("CreateSandbox", {"hostname": "h", "sandbox_id": "sb1"})
    w.client.call("DestroySandbox", {})


def test_storage_mount_point_through_a_symlink_is_refused(clean):
    w = clean
    w.client.call("CreateSandbox", {"hostname": "h", "sandbox_id": "sb2"})
    try:
        link = w.agent_path("/run/kata-containers/evil")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(w.canary)  # an absolute path the agent sees too: its work dir
        for driver, fstype, source in (("local", "local", "local"), ("ephemeral", "tmpfs", "tmpfs")):
            code, msg = status_of(w.client.call, "CreateContainer", agent_pb2.CreateContainerRequest(
                container_id="sym1", OCI=spec(w.rootfs, ["true"]),
                storages=[agent_pb2.Storage(driver=driver, fstype=fstype, source=source,
                                            mount_point="/run/kata-containers/evil/etc")]))
            assert code in (INVALID, grpc.StatusCode.FAILED_PRECONDITION), (driver, code, msg)
            assert "symlink" in msg or "mount_point" in msg, msg
        link.unlink()
    finally:
        w.client.call("DestroySandbox", {})


@pytest.mark.parametrize("path", [
    "/etc/evil", "/proc/self/comm", "/proc/thread-self/comm", f"{SHARED}/../../../../../etc/evil",
    f"{SHARED}/a/../../../../etc/evil", "relative/file", f"{SHARED}", f"{SHARED}/a\x00b", "/run/kata-containers/x",
], ids=repr)
def test_copyfile_outside_the_shared_root_is_refused(clean, path):
    w = clean
    req = agent_pb2.CopyFileRequest(path=path, file_size=5, data=b"evil\n", file_mode=0o644, uid=-1, gid=-1)
    code, msg = status_of(w.client.call, "CopyFile", req)
    assert code == INVALID and "path" in msg, (code, msg)


def test_copyfile_through_a_symlinked_parent_is_refused(clean):
    w = clean
    shared = w.agent_path(SHARED)
    shared.mkdir(parents=True, exist_ok=True)
    (shared / "evil").symlink_to(w.canary / "etc")
    try:
        req = agent_pb2.CopyFileRequest(path=f"{SHARED}/evil/passwd", file_size=5, data=b"evil\n",
                                        file_mode=0o644, uid=-1, gid=-1)
        code, msg = status_of(w.client.call, "CopyFile", req)
        assert code in (INVALID, grpc.StatusCode.FAILED_PRECONDITION) and "symlink" in msg, (code, msg)
        # a final component that is a symlink is replaced, never written through
        (shared / "file").symlink_to(w.canary / "etc" / "passwd")
        req.path = f"{SHARED}/file"
        code, msg = status_of(w.client.call, "CopyFile", req)
        if code == OK:
            assert not (shared / "file").is_symlink()
    finally:
        for name in ("evil", "file"):
            if os.path.lexists(shared / name):
                os.unlink(shared / name)


@pytest.mark.parametrize("target", ["/etc", "../../../../etc", "..", "a/../../.."])
def test_copyfile_symlink_leaving_the_root_is_refused(clean, target):
    w = clean
    req = agent_pb2.CopyFileRequest(path=f"{SHARED}/link", file_mode=0o120777, data=target.encode(),
                                    uid=-1, gid=-1)
    code, msg = status_of(w.client.call, "CopyFile", req)
    assert code == INVALID and "symlink target" in msg, (code, msg)


def test_mount_destination_through_a_symlink_stays_in_the_rootfs(clean):
    """A symlink in the image pointing at an absolute host path, used as a mount destination."""
    w = clean
    rootfs = w.fresh_rootfs()
    (rootfs / "evil").symlink_to(w.canary / "etc")
    (rootfs / "up").symlink_to("../../../../../../../../" + str(w.canary / "etc").lstrip("/"))
    oci = spec(rootfs, ["sh", "-c", "echo hacked > /evil/passwd; echo hacked > /up/passwd; echo done"])
    for dest in ("/evil", "/up"):
        m = oci.Mounts.add(destination=dest, type="tmpfs", source="tmpfs")
        m.options.extend(["nosuid"])
    cid = "symdest"
    code, msg = status_of(run, w.client, cid, oci)
    assert code in (OK, INVALID, grpc.StatusCode.FAILED_PRECONDITION), (code, msg)
    mine = [m for m in AgentState.take(w.agent.pid).mounts if str(w.canary) in m[0]]
    assert not mine, mine
    assert (w.canary / "etc" / "passwd").read_text() == "canary\n"


@pytest.mark.parametrize("dest", ["/../../../../../CANARY/etc", "/proc/../../CANARY/etc"])
def test_mount_destination_with_dotdot_stays_in_the_rootfs(clean, dest):
    w = clean
    dest = dest.replace("/CANARY", str(w.canary))
    oci = spec(w.fresh_rootfs(), ["true"])
    oci.Mounts.add(destination=dest, type="tmpfs", source="tmpfs")
    code, msg = status_of(run, w.client, "dotdot", oci)
    assert code in (OK, INVALID), (code, msg)
    if code == INVALID:
        assert "destination" in msg.lower() or "mounts" in msg.lower(), msg
    assert (w.canary / "etc" / "passwd").read_text() == "canary\n"


def test_readonly_bind_of_a_symlink_source_stays_readonly(clean):
    """Bind source a symlink to a sensitive file: the mount is the container's alone, and ro."""
    w = clean
    link = w.agent.work / "shadow-link"
    if not link.is_symlink():
        link.symlink_to(w.canary / "etc" / "passwd")
    oci = spec(w.fresh_rootfs(), ["sh", "-c", "cat /x; echo hacked > /x && echo WROTE"])
    m = oci.Mounts.add(destination="/x", type="bind", source=str(link))
    m.options.extend(["bind", "ro"])
    status, out, err = run(w.client, "robind", oci)
    assert out.startswith("canary\n") and "WROTE" not in out, (status, out, err)
    assert status != 0
    assert (w.canary / "etc" / "passwd").read_text() == "canary\n"


def test_rootfs_that_is_a_symlink_is_contained(clean):
    w = clean
    real = w.fresh_rootfs()
    (real / "marker").write_text("inside\n")
    link = w.agent.work / f"rootfs-link-{uuid.uuid4().hex[:6]}"
    link.symlink_to(real)
    code, msg = status_of(run, w.client, "symroot", spec(link, ["cat", "/marker"]))
    assert code in (OK, INVALID), (code, msg)
    if code == OK:  # followed: then the container sees exactly the real rootfs, and nothing else moved
        status, out, _ = run(w.client, "symroot", spec(link, ["cat", "/marker"]))
        assert (status, out) == (0, "inside\n")


def test_undecodable_body_is_invalid_argument(clean):
    """Bad input gets INVALID_ARGUMENT naming what is wrong (DESIGN: rules that keep it safe).
    grpcio's aio server answers a body that does not parse with UNKNOWN "Unexpected <class
    'google.protobuf.message.DecodeError'>" unless the agent decodes requests itself."""
    w = clean
    with grpc.insecure_channel(f"unix:{w.agent.sock}") as ch:
        call = ch.unary_unary(f"/{SERVICE.full_name}/CreateContainer")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
    assert err.value.code() == INVALID, (err.value.code(), err.value.details())
