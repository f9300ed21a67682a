"""The containerd shim without a VM: its protos, command line, addresses, events, and the Task
service's answers to requests it must refuse (nothing started, nothing changed)."""

from __future__ import annotations

import asyncio
import json
import importlib
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest
from google.protobuf import descriptor_pb2

from agent import ttrpc
from agent.errors import Code
from kata_agent_client.shim import cli, events, sandbox, stdio
from kata_agent_client.shim.protocols import ctd_events_pb2 as ev
from kata_agent_client.shim.protocols import ctd_shim_pb2 as pb
from kata_agent_client.shim.task import TaskService

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONTAINERD_PROTOS = ROOT / "protos" / "containerd"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONTAINERD_PROTOS.glob("*.proto")))
def test_generated_shim_protocols_are_current(name):
    from grpc_tools import protoc

    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.pb"
        assert protoc.main(["protoc", f"-I{CONTAINERD_PROTOS}", f"-I{include}", f"--descriptor_set_out={out}",
                            f"{name}.proto"]) == 0
        fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for msg in fresh.message_type:
        for field in msg.field:
            field.ClearField("json_name")
        for nested in msg.nested_type:
            for field in nested.field:
                field.ClearField("json_name")
    module = importlib.import_module(f"kata_agent_client.shim.protocols.{name}_pb2")
    committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    assert committed == fresh, f"{name}_pb2.py is stale: run python protos/generate.py"


def test_task_service_has_containerds_methods():
    names = [m.name for m in pb.DESCRIPTOR.services_by_name["Task"].methods]
    assert names == ["State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
                     "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown"]
    assert pb.DESCRIPTOR.package == "containerd.task.v2"


def test_go_style_flags():
    a = cli.parse(["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/usr/bin/containerd",
                   "-id", "abc", "-debug", "start"])
    assert (a.namespace, a.address, a.publish_binary, a.id, a.debug, a.action) == \
        ("k8s.io", "/run/c.sock", "/usr/bin/containerd", "abc", True, "start")
    b = cli.parse(["-id", "abc", "-bundle", "/b", "-namespace", "n", "-address", "/a", "delete"])
    assert (b.bundle, b.action) == ("/b", "delete")


def test_socket_address_beside_containerd_and_abstract_when_too_long():
    addr = sandbox.socket_address("/tmp/ctrd-x/c.sock", "default", "t1")
    assert addr.startswith("unix:///tmp/ctrd-x/s/")
    assert sandbox.socket_address("/tmp/ctrd-x/c.sock", "default", "t2") != addr
    assert sandbox.socket_address("/tmp/ctrd-x/c.sock", "other", "t1") != addr
    long = sandbox.socket_address("/" + "d" * 100 + "/c.sock", "default", "t1")
    assert not long.startswith("unix://") and sandbox.socket_path(long).startswith("\0")


def test_stdio_uris():
    assert stdio.io_path("") == ""
    assert stdio.io_path("/run/fifo/x-stdout") == "/run/fifo/x-stdout"
    assert stdio.io_path("file:///var/log/x") == "/var/log/x"
    with pytest.raises(stdio.UnsupportedIO, match="binary://"):
        stdio.io_path("binary:///usr/bin/logger?x=1")


def test_event_envelope_names_the_type_as_containerd_does():
    env = events.envelope("ns1", ev.TaskExit(container_id="c", id="c", pid=4, exit_status=7))
    assert env.topic == "/tasks/exit" and env.namespace == "ns1"
    assert env.event.type_url == "containerd.events.TaskExit"
    assert ev.TaskExit.FromString(env.event.value).exit_status == 7
    assert set(events.TOPICS) >= {"TaskCreate", "TaskStart", "TaskExit", "TaskDelete", "TaskExecAdded",
                                  "TaskExecStarted", "TaskOOM", "TaskPaused", "TaskResumed"}


def test_delete_without_a_shim_prints_a_delete_response(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kata_agent_client.shim", "-namespace", "n", "-address",
                        str(tmp_path / "c.sock"), "-id", "gone", "-bundle", str(tmp_path), "delete"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    reply = pb.DeleteResponse.FromString(r.stdout)
    assert reply.exit_status == 137 and reply.exited_at.seconds > 0


def test_cleanup_removes_a_run_dir_and_kills_what_names_it(tmp_path):
    d = tmp_path / "kata-py" / "0123"
    (d / "vm").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", f"{d}/vm/marker"],
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 10  # until the child has exec'd (before, its command line is ours)
        while not sandbox.processes_naming(d) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sandbox.processes_naming(d) == [sleeper.pid]
        assert sandbox.cleanup(d) == []
        assert sleeper.wait(5) == -9
        assert not d.exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def _call(service: TaskService, method: str, request, svc: str = "containerd.task.v2.Task"):
    return asyncio.run(service.dispatch(svc, method, request.SerializeToString(), None))


@pytest.fixture
def service(tmp_path):
    async def make():
        return TaskService("t1", "ns", tmp_path / "run", events.Publisher("", "ns"))

    return asyncio.run(make())


def _status(excinfo) -> Code:
    return excinfo.value.code


def test_refusals_change_nothing(service, tmp_path):
    with pytest.raises(ttrpc.Status) as e:
        _call(service, "Checkpoint", pb.CheckpointTaskRequest(id="t1"))
    assert _status(e) == Code.UNIMPLEMENTED
    with pytest.raises(ttrpc.Status) as e:
        _call(service, "State", pb.StateRequest(id="t1"))
    assert _status(e) == Code.NOT_FOUND
    with pytest.raises(ttrpc.Status) as e:
        _call(service, "State", pb.StateRequest(id="other"))
    assert _status(e) == Code.NOT_FOUND
    with pytest.raises(ttrpc.Status) as e:
        _call(service, "Create", pb.CreateTaskRequest(id="other", bundle=str(tmp_path)))
    assert _status(e) == Code.INVALID_ARGUMENT
    with pytest.raises(ttrpc.Status) as e:  # no config.json in the bundle
        _call(service, "Create", pb.CreateTaskRequest(id="t1", bundle=str(tmp_path)))
    assert _status(e) == Code.INVALID_ARGUMENT and "config.json" in e.value.message
    (tmp_path / "config.json").write_text('{"process": {"args": ["true"]}}')
    with pytest.raises(ttrpc.Status) as e:
        _call(service, "Create", pb.CreateTaskRequest(id="t1", bundle=str(tmp_path), stdout="binary:///x"))
    assert _status(e) == Code.INVALID_ARGUMENT
    with pytest.raises(ttrpc.Status) as e:
        asyncio.run(service.dispatch("containerd.task.v2.Task", "Create", b"\xff\xff", None))
    assert _status(e) == Code.INVALID_ARGUMENT
    with pytest.raises(ttrpc.Status) as e:
        _call(service, "State", pb.StateRequest(id="t1"), svc="containerd.task.v3.Task")
    assert _status(e) == Code.UNIMPLEMENTED
    assert not (tmp_path / "run").exists() and service.init is None and service.sandbox.guest is None


def test_guest_config_refuses_host_paths(service):
    base = {"process": {"args": ["true"]}, "root": {"path": "rootfs"}}
    cfg = service._guest_config(base)
    assert cfg["root"]["path"] == "/run/kata-containers/shared/containers/t1/rootfs"
    with pytest.raises(ValueError, match="bind mounts"):
        service._guest_config({**base, "mounts": [{"destination": "/etc/hosts", "source": "/etc/hosts",
                                                   "type": "bind", "options": ["rbind"]}]})
    with pytest.raises(ValueError, match="namespace"):
        service._guest_config({**base, "linux": {"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]}})


@pytest.mark.parametrize("config, says", [
    ({"mounts": [{"destination": "/etc/hosts", "source": "/etc/hosts", "type": "bind"}]}, "bind mounts"),
    ({"linux": {"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]}}, "namespace"),
    ({"process": {"args": ["true"], "user": {"uid": "root"}}}, "config.json"),
    ({"mounts": ["not an object"]}, "config.json"),
], ids=["bind-mount", "host-namespace", "bad-field", "malformed"])
def test_a_config_the_guest_cannot_run_is_refused_before_the_vm_boots(service, tmp_path, monkeypatch,
                                                                        config, says):
    """config.json is converted and checked before the VM starts (it was after the boot: a VM
    booted, and was torn down, for nothing)."""
    booted = []
    monkeypatch.setattr(service.sandbox, "start", lambda *a: booted.append(a))
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["true"]}, **config}))
    with pytest.raises(ttrpc.Status) as e:
        _call(service, "Create", pb.CreateTaskRequest(id="t1", bundle=str(tmp_path)))
    assert _status(e) == Code.INVALID_ARGUMENT and says in e.value.message, e.value.message
    assert booted == [] and service.init is None


class _Guest:
    """Stands for qemu.vm.Guest: ``stop`` ends QEMU and virtiofsd through their handles, or fails."""

    def __init__(self, fails: bool = False) -> None:
        self.fails = fails
        self.proc_running = True
        self.virtiofsd_proc = object()

    def stop(self) -> None:
        if self.fails:
            raise OSError("QMP socket gone")
        self.proc_running, self.virtiofsd_proc = False, None

    def running(self) -> bool:
        return self.proc_running


@pytest.mark.parametrize("fails", [False, True], ids=["stopped", "stop-failed"])
def test_delete_scans_proc_only_when_the_vm_was_not_stopped_through_its_handles(tmp_path, monkeypatch, fails):
    scans = []
    monkeypatch.setattr(sandbox, "processes_naming", lambda d: scans.append(d) or [])
    box = sandbox.Sandbox("t1", tmp_path / "run", guest=_Guest(fails))
    (box.run_dir / "vm").mkdir(parents=True)
    assert box.stop() == []
    assert scans == ([box.run_dir] if fails else [])  # it scanned every /proc entry at each Delete
    assert not box.run_dir.exists()
