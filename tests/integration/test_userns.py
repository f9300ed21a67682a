"""User namespaces: a container whose ids are mapped (container 0 -> host 100000, 65536 ids), seen
from inside and from the host; exec lands in its user namespace; a user namespace joined by path;
what goes wrong when the maps are not written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import grpc
import pytest

from tests.integration.test_containers import create, make_spec, read_all, run
from tests.integration.test_rollback import settled
from tests.integration.test_sandbox import agent_path, code_of, snapshot, spec_json
from tests.support import agent_cgroups, shift_ids

pytestmark = pytest.mark.timeout(120)

HOST = 100000
SIZE = 65536
MAPS = {"uidMappings": [{"containerID": 0, "hostID": HOST, "size": SIZE}],
        "gidMappings": [{"containerID": 0, "hostID": HOST, "size": SIZE}]}


@pytest.fixture(scope="module")
def mapped_dir():
    """A directory that the mapped root can walk (pytest's own tmp dirs are 0700 root's)."""
    top = tempfile.mkdtemp(prefix="userns-")
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(top)


@pytest.fixture(scope="module")
def mapped_rootfs(busybox_rootfs, mapped_dir) -> str:
    """The busybox root owned by the mapped range, as runc's own tests prepare theirs."""
    rootfs = os.path.join(mapped_dir, "rootfs")
    shutil.copytree(busybox_rootfs, rootfs, symlinks=True)
    shift_ids(rootfs, HOST)
    return rootfs


def userns_spec(rootfs, args, **kw):
    cfg = make_spec(rootfs, args, **kw)
    cfg["linux"]["namespaces"].append({"type": "user"})
    cfg["linux"].update({k: [dict(m) for m in v] for k, v in MAPS.items()})
    return cfg


def userns_json(rootfs) -> dict:
    """userns_spec's request form (CreateContainer's OCI field)."""
    oci = spec_json(rootfs, ["true"])
    oci["Linux"]["Namespaces"].append({"Type": "user"})
    for key in ("UIDMappings", "GIDMappings"):
        oci["Linux"][key] = [{"ContainerID": 0, "HostID": HOST, "Size": SIZE}]
    return oci


def test_ids_maps_devices_and_ownership(agent, mapped_rootfs, mapped_dir, container_id):
    data = os.path.join(mapped_dir, f"data-{container_id}")
    os.mkdir(data)
    os.chown(data, HOST, HOST)
    cfg = userns_spec(mapped_rootfs, ["sh", "-c",
                      "cat /proc/self/uid_map /proc/self/gid_map; id; echo x > /dev/null && echo null-ok; "
                      "head -c 4 /dev/zero | wc -c; touch /data/f && echo made; echo out > /dev/stdout; "
                      "stat -c '%u:%g %n' /dev /dev/pts /dev/shm"])
    cfg["mounts"].append({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]})
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    lines = out.splitlines()
    assert [line.split() for line in lines[:2]] == [["0", str(HOST), str(SIZE)]] * 2
    assert lines[2] == "uid=0(root) gid=0(root)"
    assert lines[3:7] == ["null-ok", "4", "made", "out"]
    assert lines[7:] == ["0:0 /dev", "0:0 /dev/pts", "0:0 /dev/shm"]
    st = os.stat(os.path.join(data, "f"))  # the host sees the mapped ids
    assert (st.st_uid, st.st_gid) == (HOST, HOST)
    # runc does not chown the rootfs; what the init made in it (a mount target) is the mapped root's
    target = os.path.join(mapped_rootfs, "data")
    assert (os.stat(target).st_uid, os.stat(target).st_gid) == (HOST, HOST)
    os.rmdir(target)
    shutil.rmtree(data)


def test_process_user_is_a_container_id(agent, mapped_rootfs, container_id):
    cfg = userns_spec(mapped_rootfs, ["sh", "-c", "id; cat /proc/self/status | grep -E '^(Uid|Gid|Groups):'"])
    cfg["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [100, 2000]}
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "uid=1000(user) gid=1000(user) groups=100(users),2000(extra)", lines
    assert lines[1].split()[1:] == ["1000"] * 4
    assert sorted(lines[3].split()[1:]) == ["100", "2000"]


def test_exec_lands_in_the_containers_user_namespace(agent, mapped_rootfs, container_id):
    create(agent, container_id, userns_spec(mapped_rootfs, ["sleep", "100"]))
    agent.client.call("StartContainer", {"container_id": container_id})
    script = "readlink /proc/self/ns/user; readlink /proc/1/ns/user; id -u; cat /proc/self/uid_map"
    for exec_id, uid in (("e0", 0), ("e1", 1000)):
        proc = {"Args": ["sh", "-c", script], "Cwd": "/", "Env": ["PATH=/bin"], "User": {"UID": uid, "GID": uid}}
        agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": exec_id, "process": proc})
        assert agent.client.call("WaitProcess", {"container_id": container_id, "exec_id": exec_id}).status == 0
    as_root = read_all(agent, container_id, exec_id="e0").decode().splitlines()
    assert as_root[0] == as_root[1] and as_root[0].startswith("user:[")  # the init's
    assert as_root[0] != os.readlink("/proc/self/ns/user")
    assert as_root[2] == "0" and as_root[3].split() == ["0", str(HOST), str(SIZE)]
    as_user = read_all(agent, container_id, exec_id="e1").decode().splitlines()
    assert as_user[0] == as_root[0] and as_user[-2:] == ["1000", as_root[3]]
    unmapped = {**proc, "User": {"UID": SIZE, "GID": 0}}  # one past the map
    with pytest.raises(grpc.RpcError) as e:
        agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e2", "process": unmapped})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"process.User.UID: {SIZE} is not mapped by OCI.Linux.UIDMappings"
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_sandbox_namespaces_are_joined_before_the_user_namespace(agent, mapped_rootfs, container_id):
    """The sandbox's pinned UTS and IPC namespaces belong to the initial user namespace: joined
    after the container's own, setns would fail with EPERM (runc joins them first too)."""
    agent.client.call("CreateSandbox", {"hostname": "sbx"})
    pinned = {kind: os.stat(agent_path(agent, f"/run/sandbox-ns/{kind}")).st_ino for kind in ("uts", "ipc")}
    cfg = userns_spec(mapped_rootfs, ["sh", "-c", "hostname; readlink /proc/self/ns/uts; "
                                                  "readlink /proc/self/ns/ipc; readlink /proc/self/ns/user"])
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[:3] == ["sbx", f"uts:[{pinned['uts']}]", f"ipc:[{pinned['ipc']}]"]
    assert lines[3] != os.readlink("/proc/self/ns/user")


def test_a_failure_after_the_maps_undoes_everything(agent_factory, mapped_rootfs):
    agent = agent_factory(env={"KATA_AGENT_FAULT_INJECT": "userns_maps"})
    agent.client.call("CreateSandbox", {"hostname": "ok"})
    before = snapshot(agent)
    cgroups_before = agent_cgroups()
    request = {"container_id": "faulty", "OCI": userns_json(mapped_rootfs)}
    for _ in range(2):  # the id is free again
        code, msg = code_of(agent, "CreateContainer", request)
        assert code == grpc.StatusCode.INTERNAL and msg == "fault injected after step userns_maps"
        assert settled(agent, before) == before
        assert agent_cgroups() == cgroups_before


HOLD_USERNS = """
import ctypes, sys, time
assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0
print("unshared", flush=True)
time.sleep(60)
"""


def test_a_user_namespace_joined_by_path(agent, mapped_rootfs, container_id):
    """Joined by path (here another process's, mapped the same way): no maps are written, the
    container's root is that namespace's; mappings given with it must be its own."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_USERNS], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"unshared\n"
        theirs = f"/proc/{holder.pid}/ns/user"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(f"0 {HOST} {SIZE}\n")
        cfg = make_spec(mapped_rootfs, ["sh", "-c", "readlink /proc/self/ns/user; id -u; cat /proc/self/uid_map"])
        cfg["linux"]["namespaces"].append({"type": "user", "path": theirs})
        status, out, err = run(agent, container_id, cfg)
        assert status == 0, err
        lines = out.splitlines()
        assert lines[:2] == [os.readlink(theirs), "0"] and lines[2].split() == ["0", str(HOST), str(SIZE)]
        cfg["linux"].update({k: [dict(m, hostID=HOST + 1) for m in v] for k, v in MAPS.items()})
        with pytest.raises(grpc.RpcError) as e:
            create(agent, container_id + "-x", cfg)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "uid_map" in e.value.details()
    finally:
        holder.kill()
        holder.wait()


def test_bad_maps_are_refused_and_change_nothing(agent, mapped_rootfs):
    agent.client.call("CreateSandbox", {"hostname": "ok"})
    before = snapshot(agent)
    for change, field in (({"UIDMappings": [{"ContainerID": 0, "HostID": HOST, "Size": 10},
                                            {"ContainerID": 5, "HostID": 0, "Size": 1}]}, "OCI.Linux.UIDMappings[1]"),
                          ({"GIDMappings": []}, "OCI.Linux.GIDMappings"),
                          ({"UIDMappings": [{"ContainerID": 0, "HostID": 4294967295, "Size": 2}]},
                           "OCI.Linux.UIDMappings[0].HostID")):
        request = {"container_id": "c", "OCI": userns_json(mapped_rootfs)}
        request["OCI"]["Linux"].update(change)
        code, msg = code_of(agent, "CreateContainer", request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith(field), msg
        assert snapshot(agent) == before


def test_the_sandbox_pid_namespace_is_refused_with_a_user_namespace(agent, mapped_rootfs):
    agent.client.call("CreateSandbox", {"hostname": "ok", "sandbox_pidns": True})
    before = snapshot(agent)
    request = {"container_id": "c", "sandbox_pidns": True, "OCI": userns_json(mapped_rootfs)}
    code, msg = code_of(agent, "CreateContainer", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("sandbox_pidns:"), msg
    assert snapshot(agent) == before


def test_a_terminal_in_a_user_namespace(agent, mapped_rootfs, container_id):
    """The pty is the mapped root's (as runc gives its stdio): the container's root may reopen it."""
    cfg = userns_spec(mapped_rootfs, ["sh", "-c", "tty; stat -c %u:%g /dev/console; echo reopened > /dev/console"])
    cfg["process"]["terminal"] = True
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, (out, err)
    assert out.replace("\r", "").splitlines() == ["/dev/console", "0:0", "reopened"]


CAP_SYS_RESOURCE = 24


def _has_cap(cap: int) -> bool:
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(eff.split()[1], 16) >> cap & 1)


@pytest.mark.skipif(not _has_cap(CAP_SYS_RESOURCE), reason="no CAP_SYS_RESOURCE here (tests/vm checks it in the guest)")
def test_limits_that_need_the_initial_user_namespace(agent, mapped_rootfs, container_id):
    """A hard rlimit raised and a negative oom_score_adj need CAP_SYS_RESOURCE in the initial
    user namespace: they are set before the container's is entered (runc sets them from outside),
    for the init and for an exec."""
    cfg = userns_spec(mapped_rootfs, ["sh", "-c", "ulimit -Hr; cat /proc/self/oom_score_adj; sleep 100"])
    cfg["process"]["rlimits"].append({"type": "RLIMIT_RTPRIO", "hard": 7, "soft": 7})
    cfg["process"]["oomScoreAdj"] = -500
    create(agent, container_id, cfg)
    agent.client.call("StartContainer", {"container_id": container_id})
    proc = {"Args": ["sh", "-c", "ulimit -Hr; cat /proc/self/oom_score_adj"], "Cwd": "/", "Env": ["PATH=/bin"],
            "Rlimits": [{"Type": "RLIMIT_RTPRIO", "Hard": 9, "Soft": 9}], "OOMScoreAdj": -600}
    agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e1", "process": proc})
    assert agent.client.call("WaitProcess", {"container_id": container_id, "exec_id": "e1"}).status == 0
    assert read_all(agent, container_id, exec_id="e1").decode().split() == ["9", "-600"]
    agent.client.call("SignalProcess", {"container_id": container_id, "signal": 9})
    agent.client.call("WaitProcess", {"container_id": container_id})
    assert read_all(agent, container_id).decode().split() == ["7", "-500"]
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_sysfs_without_a_network_namespace_of_its_own(agent, mapped_rootfs, container_id):
    """sysfs cannot be mounted from a user namespace that does not own the network namespace:
    the guest's /sys is bound instead, read-only on top (`runc spec --rootless`)."""
    cfg = userns_spec(mapped_rootfs, ["sh", "-c", "awk '$5 == \"/sys\" { print $4, $6 }' /proc/self/mountinfo; "
                                                  "ls /sys/class/net | grep -c '^lo$'; touch /sys/x || echo ro"])
    cfg["linux"]["namespaces"] = [ns for ns in cfg["linux"]["namespaces"] if ns["type"] != "network"]
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split()[0] == "/" and lines[0].split()[1].startswith("ro,"), lines
    assert lines[1:] == ["1", "ro"]


def test_a_devpts_gid_the_map_leaves_out_is_dropped(agent, mapped_rootfs, container_id):
    """Only the container's root is mapped: devpts's gid=5 would make the mount fail (EINVAL)."""
    cfg = userns_spec(mapped_rootfs, ["sh", "-c", "cat /proc/self/gid_map; grep -c ' /dev/pts ' /proc/self/mountinfo"])
    for key in ("uidMappings", "gidMappings"):
        cfg["linux"][key][0]["size"] = 1
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    assert out.split() == ["0", str(HOST), "1", "1"]


def test_spec_devices_are_bound_from_the_guest(agent, mapped_rootfs, container_id):
    """No mknod in a user namespace: a device of the spec is the guest's node bound (runc)."""
    cfg = userns_spec(mapped_rootfs, ["sh", "-c", "[ -c /dev/kmsg ] && echo char; "
                                                  "grep -c ' /dev/kmsg ' /proc/self/mountinfo"])
    cfg["linux"]["devices"] = [{"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11}]
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    assert out.split() == ["char", "1"]
