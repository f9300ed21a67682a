"""CreateSandbox / DestroySandbox against a real agent in a private mount namespace."""

from __future__ import annotations

import os
import pathlib
import subprocess
import time

import grpc
import pytest
from google.protobuf import json_format

from kata_agent_client.spec import default_config, spec_from_config

pytestmark = pytest.mark.timeout(120)
KATA = "/run/kata-containers"


# --- helpers shared by test_storage*, test_rollback* -----------------------------------------

def code_of(agent, method, req) -> tuple[grpc.StatusCode, str]:
    try:
        agent.client.call(method, req)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def agent_path(agent, path: str) -> pathlib.Path:
    """``path`` as the agent sees it (its own mount namespace)."""
    return pathlib.Path(f"/proc/{agent.pid}/root{path}")


def mounts(agent) -> list[tuple[str, str, str]]:
    """The agent's mount table without mount ids: (mount point, fstype, source)."""
    out = []
    for line in pathlib.Path(f"/proc/{agent.pid}/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        a, b = left.split(), right.split()
        out.append((a[4], b[0], b[1]))
    return sorted(out)


def run_tree(agent) -> list[str]:
    root = agent_path(agent, "/run")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def snapshot(agent) -> tuple:
    return mounts(agent), run_tree(agent), children(agent)


def children(agent) -> set[str]:
    return set(pathlib.Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split())


def spec_json(rootfs, args, **overrides) -> dict:
    cfg = default_config(args, rootfs=str(rootfs))
    cfg["root"]["readonly"] = False
    cfg.update(overrides)
    return json_format.MessageToDict(spec_from_config(cfg))


def read_all(agent, cid, stream="ReadStdout") -> bytes:
    out = b""
    while True:
        data = agent.client.call(stream, {"container_id": cid, "len": 65536}).data
        if not data:
            return out
        out += data


def start_and_wait(agent, cid) -> tuple[int, str]:
    agent.client.call("StartContainer", {"container_id": cid})
    status = agent.client.call("WaitProcess", {"container_id": cid}).status
    return status, read_all(agent, cid).decode()


def run_sh(agent, cid, rootfs, script, **extra) -> tuple[int, str]:
    agent.client.call("CreateContainer", {"container_id": cid,
                                          "OCI": spec_json(rootfs, ["sh", "-c", script]), **extra})
    try:
        return start_and_wait(agent, cid)
    finally:
        agent.client.call("RemoveContainer", {"container_id": cid})


# --- tests -----------------------------------------------------------------------------------

def test_hostname_pinned_namespaces_dns_and_second_create(agent):
    agent.client.call("CreateSandbox", {"hostname": "sbx-host", "sandbox_id": "sb1",
                                        "dns": ["nameserver 192.0.2.1", "search example.test"]})
    ns = agent_path(agent, "/run/sandbox-ns")
    host = subprocess.run(["nsenter", f"--uts={ns}/uts", "hostname"], capture_output=True, text=True)
    assert host.stdout.strip() == "sbx-host"
    assert os.uname().nodename != "sbx-host"  # the agent's (and machine's) own hostname untouched
    assert os.stat(ns / "ipc").st_ino != os.stat(f"/proc/{agent.pid}/ns/ipc").st_ino
    assert agent_path(agent, "/etc/resolv.conf").read_text() == "nameserver 192.0.2.1\nsearch example.test\n"
    assert ("/etc/resolv.conf", "tmpfs", "agent-run") in mounts(agent)

    code, msg = code_of(agent, "CreateSandbox", {"hostname": "again"})
    assert code == grpc.StatusCode.ALREADY_EXISTS and "sb1" in msg


def test_destroy_then_create_again(agent):
    before = snapshot(agent)
    agent.client.call("CreateSandbox", {"hostname": "one", "dns": ["nameserver 192.0.2.1"],
                                        "storages": [{"driver": "ephemeral", "source": "tmpfs",
                                                      "mount_point": f"{KATA}/sandbox/scratch"}]})
    assert snapshot(agent) != before
    agent.client.call("DestroySandbox", {})
    assert snapshot(agent) == before
    agent.client.call("CreateSandbox", {"hostname": "two"})
    host = subprocess.run(["nsenter", f"--uts={agent_path(agent, '/run/sandbox-ns/uts')}", "hostname"],
                          capture_output=True, text=True)
    assert host.stdout.strip() == "two"


def test_modprobe_failure_undoes_everything(agent):
    before = snapshot(agent)
    code, msg = code_of(agent, "CreateSandbox", {
        "hostname": "h", "dns": ["nameserver 192.0.2.1"],
        "kernel_modules": [{"name": "no_such_module_xyz", "parameters": ["a=1"]}]})
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "kernel_modules[0]" in msg and "no_such_module_xyz" in msg
    assert snapshot(agent) == before
    agent.client.call("CreateSandbox", {"hostname": "h"})  # nothing was left half-made


@pytest.mark.parametrize("req, field", [
    ({"hostname": "a/b"}, "hostname"),
    ({"dns": ["nameserver 1.1.1.1\nnameserver 2.2.2.2"]}, "dns[0]"),
    ({"kernel_modules": [{"name": "../evil"}]}, "kernel_modules[0].name"),
    ({"kernel_modules": [{"name": "loop", "parameters": ["--force"]}]}, "kernel_modules[0].parameters[0]"),
    ({"sandbox_id": "../x"}, "sandbox_id"),
    ({"storages": [{"driver": "nosuch", "mount_point": f"{KATA}/x"}]}, "storages[0].driver"),
    ({"storages": [{"driver": "ephemeral", "mount_point": "/tmp/x"}]}, "storages[0].mount_point"),
    ({"storages": [{"driver": "ephemeral", "mount_point": f"{KATA}/../etc"}]}, "storages[0].mount_point"),
])
def test_bad_input_is_invalid_argument_and_changes_nothing(agent, req, field):
    before = snapshot(agent)
    code, msg = code_of(agent, "CreateSandbox", req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith(field), msg
    assert snapshot(agent) == before


def test_containers_share_uts_ipc_and_see_sandbox_hostname(agent, busybox_rootfs):
    agent.client.call("CreateSandbox", {"hostname": "shared-host"})
    ids = {}
    for cid in ("ns-a", "ns-b"):
        status, out = run_sh(agent, cid, busybox_rootfs,
                             "hostname; readlink /proc/self/ns/uts; readlink /proc/self/ns/ipc")
        assert status == 0
        ids[cid] = out.split()
    assert ids["ns-a"][0] == "shared-host"
    assert ids["ns-a"] == ids["ns-b"]
    pinned = os.stat(agent_path(agent, "/run/sandbox-ns/uts")).st_ino
    assert ids["ns-a"][1] == f"uts:[{pinned}]"


def test_sandbox_pidns_shared_and_zombies_reaped(agent, busybox_rootfs):
    agent.client.call("CreateSandbox", {"hostname": "p", "sandbox_pidns": True})
    spec = spec_json(busybox_rootfs, ["sleep", "30"])
    agent.client.call("CreateContainer", {"container_id": "pid-a", "OCI": spec, "sandbox_pidns": True})
    agent.client.call("StartContainer", {"container_id": "pid-a"})
    try:
        # the second container sees the first one's sleep, and its own orphan is reaped by init:
        # the orphan's pid leaves /proc (a zombie's would stay) within the shell's 10 s
        status, out = run_sh(agent, "pid-b", busybox_rootfs,
                             "pid=$(sleep 0.2 >/dev/null 2>&1 & echo $!); i=0; "
                             "while [ -e /proc/$pid ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; "
                             "[ -e /proc/$pid ] && echo \"orphan $pid left: $(cat /proc/$pid/stat)\" "
                             "|| echo 'orphan reaped'; ps -o pid,stat,args",
                             sandbox_pidns=True)
        assert status == 0, out
        assert "sleep 30" in out
        assert "orphan reaped" in out, out
        assert " Z " not in out and "<defunct>" not in out, out
    finally:
        agent.client.call("SignalProcess", {"container_id": "pid-a", "signal": 9})
        agent.client.call("WaitProcess", {"container_id": "pid-a"})
        agent.client.call("RemoveContainer", {"container_id": "pid-a"})
    before = children(agent)
    agent.client.call("DestroySandbox", {})
    deadline = time.monotonic() + 10
    while len(children(agent)) != len(before) - 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(children(agent)) == len(before) - 1, (before, children(agent))  # its init is gone


def test_sandbox_pidns_needed_for_container_pidns(agent, busybox_rootfs):
    agent.client.call("CreateSandbox", {"hostname": "p"})
    code, msg = code_of(agent, "CreateContainer", {
        "container_id": "c1", "OCI": spec_json(busybox_rootfs, ["true"]), "sandbox_pidns": True})
    assert code == grpc.StatusCode.FAILED_PRECONDITION and msg.startswith("sandbox_pidns")


def test_containers_see_the_sandbox_dns_unless_they_mount_their_own(agent, busybox_rootfs, tmp_path):
    agent.client.call("CreateSandbox", {"hostname": "dns-host", "dns": ["nameserver 192.0.2.53"]})
    status, out = run_sh(agent, "dns-a", busybox_rootfs, "cat /etc/resolv.conf; echo x >> /etc/resolv.conf")
    assert out.startswith("nameserver 192.0.2.53\n")
    assert status != 0, "the sandbox resolv.conf must be read-only in the container"

    own = tmp_path / "resolv.conf"
    own.write_text("nameserver 198.51.100.1\n")
    mounts_ = [{"destination": "/etc/resolv.conf", "source": str(own), "type": "bind",
                "options": ["bind", "ro"]}]
    agent.client.call("CreateContainer", {"container_id": "dns-b", "OCI": spec_json(
        busybox_rootfs, ["cat", "/etc/resolv.conf"], mounts=default_config([])["mounts"] + mounts_)})
    try:
        assert start_and_wait(agent, "dns-b") == (0, "nameserver 198.51.100.1\n")
    finally:
        agent.client.call("RemoveContainer", {"container_id": "dns-b"})
