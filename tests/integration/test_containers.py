"""Container lifecycle over gRPC against a real agent, on a busybox rootfs."""

from __future__ import annotations

import base64
import os
import pathlib
import shutil
import signal
import subprocess
import time

import grpc
import pytest

from kata_agent_client.spec import default_config, spec_from_config

from tests.support import UNIFIED

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["as-mounted", "v1-only"])
def agent(request, agent_factory):
    """Each test runs twice. With the cgroups as mounted here (hybrid), a container's init is
    forked by the spawner's intermediate child, into its v2 cgroup. With the cgroup2 mount hidden
    (v1 only), the spawner's waiting PID 1 zygote becomes the init (agent.runtime.spawner)."""
    if request.param == "v1-only" and not os.path.ismount(UNIFIED):
        pytest.skip(f"no hybrid cgroup2 mount at {UNIFIED} to hide")
    return agent_factory(cgroup_v1_only=request.param == "v1-only")


def make_spec(rootfs, args, **overrides):
    cfg = default_config(args, rootfs=str(rootfs))
    cfg["root"]["readonly"] = overrides.pop("readonly", False)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def create(agent, cid, cfg, **extra):
    agent.client.call("CreateContainer", {"container_id": cid, "OCI": _json(cfg), **extra})


def _json(cfg):
    from google.protobuf import json_format

    return json_format.MessageToDict(spec_from_config(cfg))


def read_all(agent, cid, stream="ReadStdout", exec_id=""):
    out = b""
    while True:
        data = agent.client.call(stream, {"container_id": cid, "exec_id": exec_id, "len": 65536}).data
        if not data:
            return out
        out += data


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run(agent, cid, cfg, stdin: bytes | None = None):
    """Create, start, wait, read everything, remove: (status, stdout, stderr)."""
    create(agent, cid, cfg)
    agent.client.call("StartContainer", {"container_id": cid})
    if stdin is not None:
        agent.client.call("WriteStdin", {"container_id": cid, "data": b64(stdin)})
        agent.client.call("CloseStdin", {"container_id": cid})
    status = agent.client.call("WaitProcess", {"container_id": cid}).status
    out, err = read_all(agent, cid), read_all(agent, cid, "ReadStderr")
    agent.client.call("RemoveContainer", {"container_id": cid})
    return status, out.decode(), err.decode()


def sh(agent, cid, rootfs, script, **kw):
    return run(agent, cid, make_spec(rootfs, ["sh", "-c", script], **kw))


def test_echo_lifecycle(agent, busybox_rootfs, container_id):
    status, out, err = sh(agent, container_id, busybox_rootfs, "echo hi; echo oops >&2; exit 3")
    assert (status, out, err) == (3, "hi\n", "oops\n")


def test_pid1_and_hostname(agent, busybox_rootfs, container_id):
    status, out, _ = sh(agent, container_id, busybox_rootfs, "echo $$; hostname", hostname="box1")
    assert status == 0
    assert out.split() == ["1", "box1"]


def test_init_and_exec_each_lead_a_session(agent, busybox_rootfs, container_id):
    """As runc: the init, and each exec'd process, start a session and process group of their
    own (the zygote that becomes the init makes its session while it waits). Outside them, in
    the agent's session, the container's /proc would show 0."""
    status, out, _ = sh(agent, container_id, busybox_rootfs, "cut -d' ' -f5,6 /proc/1/stat")
    assert (status, out.split()) == (0, ["1", "1"])
    create(agent, container_id, make_spec(busybox_rootfs, ["sleep", "100"]))
    agent.client.call("StartContainer", {"container_id": container_id})
    proc = {"Args": ["sh", "-c", "echo $$ $$; cut -d' ' -f5,6 /proc/$$/stat"], "Cwd": "/", "Env": ["PATH=/bin"]}
    agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e1", "process": proc})
    assert agent.client.call("WaitProcess", {"container_id": container_id, "exec_id": "e1"}).status == 0
    mine, stat = read_all(agent, container_id, exec_id="e1").decode().splitlines()
    assert stat == mine
    agent.client.call("SignalProcess", {"container_id": container_id, "signal": 9})
    agent.client.call("WaitProcess", {"container_id": container_id})
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_network_namespace_new_shared_or_joined(agent, busybox_rootfs, container_id):
    """A new network namespace when the spec lists one, the agent's when it does not, and the
    one given by path. (The PID 1 zygote makes a network namespace before any request comes.)"""
    agent_ns = os.readlink(f"/proc/{agent.pid}/ns/net")
    other = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        theirs = f"/proc/{other.pid}/ns/net"
        deadline = time.monotonic() + 10
        while os.readlink(theirs) == agent_ns:  # until unshare has made it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        seen = {}
        for case, ns in (("new", {"type": "network"}), ("shared", None),
                         ("joined", {"type": "network", "path": theirs})):
            cfg = make_spec(busybox_rootfs, ["readlink", "/proc/self/ns/net"])
            listed = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
            cfg["linux"]["namespaces"] = listed + ([ns] if ns else [])
            status, out, err = run(agent, f"{container_id}-{case}", cfg)
            assert status == 0, err
            seen[case] = out.strip()
        assert seen["shared"] == agent_ns
        assert seen["joined"] == os.readlink(theirs)
        assert seen["new"].startswith("net:[") and seen["new"] not in (agent_ns, seen["joined"])
    finally:
        other.kill()
        other.wait()


def test_user_groups_caps_nnp_rlimits(agent, busybox_rootfs, container_id):
    cfg = make_spec(busybox_rootfs, ["sh", "-c",
                    "id -u; id -g; id -G; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ulimit -n"])
    cfg["process"]["user"] = {"uid": 1000, "gid": 100, "additionalGids": [2000]}
    cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}]
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    lines = out.split("\n")
    assert lines[:3] == ["1000", "100", "100 2000"]
    # KILL, NET_BIND_SERVICE, AUDIT_WRITE bound; not inheritable, so none survive exec as uid 1000
    assert "CapEff:\t0000000000000000" in lines
    assert "CapBnd:\t0000000020000420" in lines
    assert "NoNewPrivs:\t1" in lines
    assert lines[6] == "256"


def test_env_home_cwd_and_string_user(agent, busybox_rootfs, container_id):
    cfg = make_spec(busybox_rootfs, ["sh", "-c", "echo $HOME; pwd; echo $FOO; id -un; grep CapEff /proc/self/status"])
    cfg["process"]["env"] = ["PATH=/bin:/usr/bin", "FOO=bar baz"]
    cfg["process"]["cwd"] = "/tmp"
    cfg["process"]["capabilities"]["inheritable"] = cfg["process"]["capabilities"]["bounding"]
    create(agent, container_id, cfg, string_user={"uid": "user"})
    agent.client.call("StartContainer", {"container_id": container_id})
    assert agent.client.call("WaitProcess", {"container_id": container_id}).status == 0
    assert read_all(agent, container_id).decode().split("\n")[:5] == ["/home/user", "/tmp", "bar baz", "user",
                                                                     "CapEff:\t0000000020000420"]
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_masked_readonly_paths_and_readonly_root(agent, busybox_rootfs, container_id):
    script = ("cat /proc/kcore | wc -c; ls /sys/firmware | wc -l; echo 1 > /proc/sys/kernel/domainname || echo ro-ok; "
              "touch /x || echo root-ro; touch /dev/shm/x && echo shm-rw")
    status, out, err = sh(agent, container_id, busybox_rootfs, script, readonly=True)
    assert out.split() == ["0", "0", "ro-ok", "root-ro", "shm-rw"], err


def test_bind_mount_and_dev(agent, busybox_rootfs, container_id, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_text("hello\n")
    cfg = make_spec(busybox_rootfs, ["sh", "-c", "cat /mnt/data/f; touch /mnt/data/g || echo ro; ls /dev | sort | tr '\\n' ' '; echo; "
                                     "readlink /dev/ptmx; readlink /dev/fd; echo x > /dev/null && echo null-ok"])
    cfg["mounts"].append({"destination": "/mnt/data", "type": "bind", "source": str(tmp_path / "data"),
                          "options": ["rbind", "ro"]})
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    lines = out.split("\n")
    assert lines[:2] == ["hello", "ro"]
    for name in ("null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue",
                 "fd", "stdin", "stdout", "stderr"):
        assert name in lines[2].split(), lines[2]
    assert lines[3:6] == ["pts/ptmx", "/proc/self/fd", "null-ok"]
    assert not (tmp_path / "data" / "g").exists()


def test_default_devices_in_the_rootfs_own_dev(agent, busybox_rootfs, container_id, tmp_path):
    """Without a /dev mount in the spec the nodes go into the rootfs's own /dev: a stale regular
    file there is replaced by the device, a link already there is kept (as runc does)."""
    rootfs = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, rootfs, symlinks=True)
    (rootfs / "dev" / "null").write_text("stale\n")
    (rootfs / "dev" / "fd").symlink_to("/nowhere")
    cfg = make_spec(rootfs, ["sh", "-c", "[ -c /dev/null ] && [ -c /dev/zero ] && echo nodes; "
                                         "stat -c %u:%g /dev/null; readlink /dev/fd; readlink /dev/stdin"])
    cfg["mounts"] = [m for m in cfg["mounts"] if m["destination"] != "/dev"]
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    assert out.split() == ["nodes", "0:0", "/nowhere", "/proc/self/fd/0"]


def test_mount_destination_cannot_escape_through_symlink(agent, busybox_rootfs, container_id, tmp_path):
    rootfs = tmp_path / "rootfs"
    from tests.support import make_busybox_rootfs

    make_busybox_rootfs(rootfs)
    (rootfs / "escape").symlink_to("../../../../../../..")
    cfg = make_spec(rootfs, ["sh", "-c", "ls /escape/target"])
    cfg["mounts"].append({"destination": "/escape/target", "type": "tmpfs", "source": "tmpfs"})
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    assert (rootfs / "target").is_dir()  # created inside the rootfs, not at the host's /target
    assert not pathlib.Path("/target").exists()


def test_kill_gives_137_and_signal_to_stopped_is_harmless(agent, busybox_rootfs, container_id):
    create(agent, container_id, make_spec(busybox_rootfs, ["sleep", "100"]))
    agent.client.call("StartContainer", {"container_id": container_id})
    agent.client.call("SignalProcess", {"container_id": container_id, "signal": 9})
    assert agent.client.call("WaitProcess", {"container_id": container_id}).status == 137
    assert agent.client.call("WaitProcess", {"container_id": container_id}).status == 137
    agent.client.call("SignalProcess", {"container_id": container_id, "signal": 15})
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_stdin_roundtrip(agent, busybox_rootfs, container_id):
    status, out, err = run(agent, container_id, make_spec(busybox_rootfs, ["sh", "-c", "tr a-z A-Z; echo e >&2"]),
                           stdin=b"hello\n")
    assert (status, out, err) == (0, "HELLO\n", "e\n")


def test_background_child_holding_stdout_does_not_hang_wait(agent, busybox_rootfs, container_id):
    create(agent, container_id, make_spec(busybox_rootfs, ["sh", "-c", "sleep 100 & echo started"]))
    agent.client.call("StartContainer", {"container_id": container_id})
    assert agent.client.call("WaitProcess", {"container_id": container_id}, timeout=10).status == 0
    assert agent.client.call("ReadStdout", {"container_id": container_id, "len": 100}).data == b"started\n"
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_tty_and_resize(agent, busybox_rootfs, container_id):
    cfg = make_spec(busybox_rootfs, ["sh", "-c", "[ -t 0 ] && echo tty; read x; stty size"])
    cfg["process"]["terminal"] = True
    create(agent, container_id, cfg)
    agent.client.call("StartContainer", {"container_id": container_id})
    agent.client.call("TtyWinResize", {"container_id": container_id, "row": 33, "column": 77})
    agent.client.call("WriteStdin", {"container_id": container_id, "data": b64(b"go\n")})
    assert agent.client.call("WaitProcess", {"container_id": container_id}).status == 0
    out = read_all(agent, container_id).decode()
    assert "tty" in out and "33 77" in out, out
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_exec_joins_pid_namespace_and_has_own_user(agent, busybox_rootfs, container_id):
    create(agent, container_id, make_spec(busybox_rootfs, ["sleep", "100"], hostname="h1"))
    agent.client.call("StartContainer", {"container_id": container_id})
    proc = {"Args": ["sh", "-c", "ps -o pid,comm | grep -c sleep; hostname; id -u; pwd"], "Cwd": "/tmp",
            "Env": ["PATH=/bin"], "User": {"UID": 1000, "GID": 1000}}
    agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e1", "process": proc})
    assert agent.client.call("WaitProcess", {"container_id": container_id, "exec_id": "e1"}).status == 0
    assert read_all(agent, container_id, exec_id="e1").decode().split() == ["1", "h1", "1000", "/tmp"]
    # waited for: the id is free again (as Kata's agent forgets it); a running one's is not
    agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e1", "process": proc})
    assert agent.client.call("WaitProcess", {"container_id": container_id, "exec_id": "e1"}).status == 0
    sleeper = {**proc, "Args": ["sleep", "100"]}
    agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e3", "process": sleeper})
    with pytest.raises(grpc.RpcError) as e:
        agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e3", "process": sleeper})
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    agent.client.call("SignalProcess", {"container_id": container_id, "signal": 9})
    agent.client.call("WaitProcess", {"container_id": container_id})
    with pytest.raises(grpc.RpcError) as e:
        agent.client.call("ExecProcess", {"container_id": container_id, "exec_id": "e2", "process": proc})
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    agent.client.call("RemoveContainer", {"container_id": container_id})


def _code(agent, method, req):
    with pytest.raises(grpc.RpcError) as e:
        agent.client.call(method, req)
    return e.value.code(), e.value.details()


def test_error_statuses(agent, busybox_rootfs, container_id):
    for method in ("StartContainer", "WaitProcess", "RemoveContainer", "ReadStdout", "SignalProcess"):
        assert _code(agent, method, {"container_id": "nope"})[0] == grpc.StatusCode.NOT_FOUND
    cfg = make_spec(busybox_rootfs, ["true"])
    bad = make_spec(busybox_rootfs, ["true"])
    bad["mounts"][0]["destination"] = "proc"
    code, msg = _code(agent, "CreateContainer", {"container_id": container_id, "OCI": _json(bad)})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "OCI.Mounts[0].destination" in msg
    create(agent, container_id, cfg)
    code, _ = _code(agent, "CreateContainer", {"container_id": container_id, "OCI": _json(cfg)})
    assert code == grpc.StatusCode.ALREADY_EXISTS
    agent.client.call("RemoveContainer", {"container_id": container_id})
    # as runc: the program is looked up at create, so a missing one fails the create
    for args in (["/no/such/binary"], ["no-such-program"], ["/etc/passwd"]):
        code, msg = _code(agent, "CreateContainer",
                          {"container_id": container_id, "OCI": _json(make_spec(busybox_rootfs, args))})
        assert code == grpc.StatusCode.FAILED_PRECONDITION and args[0] in msg, msg
    assert _code(agent, "WaitProcess", {"container_id": container_id})[0] == grpc.StatusCode.NOT_FOUND
    create(agent, container_id, cfg)  # the id is free
    agent.client.call("RemoveContainer", {"container_id": container_id})


def _mount_count(pid: int) -> int:
    return len(pathlib.Path(f"/proc/{pid}/mountinfo").read_text().splitlines())


def _agent_pid(agent) -> int:
    """The python agent (the fixture's pid is unshare, which exec'd sh, which exec'd python)."""
    return agent.pid


def test_nothing_left_behind_and_id_reusable(agent, busybox_rootfs, container_id):
    before_mounts = _mount_count(_agent_pid(agent))
    children_before = _workers(agent)
    bad = make_spec(busybox_rootfs, ["true"])
    bad["mounts"].append({"destination": "/x", "type": "nosuchfs", "source": "none"})
    code, msg = _code(agent, "CreateContainer", {"container_id": container_id, "OCI": _json(bad)})
    assert code != grpc.StatusCode.OK and "/x" in msg
    for _ in range(2):
        status, out, _ = sh(agent, container_id, busybox_rootfs, "echo again")
        assert (status, out) == (0, "again\n")
    assert _mount_count(_agent_pid(agent)) == before_mounts
    assert _workers(agent) == children_before


def _children(pid: int) -> set[str]:
    text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return set(text.split())


def _workers(agent) -> set[str]:
    """The agent's children but its idle PID 1 zygote (a new one follows each that is taken)."""
    return {p for p in _children(agent.pid) if p not in map(str, _zygotes(agent))}


def _spawner_processes(agent) -> list[int]:
    """The agent's children that run agent.runtime.spawner: the spawner, and the PID 1 zygote
    (forked by it, adopted by the agent)."""
    out = []
    for pid in sorted(int(p) for p in _children(agent.pid)):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"agent.runtime.spawner import main" in cmdline:
            out.append(pid)
    return out


def _own_pidns(pid: int, agent) -> bool:
    return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{agent.pid}/ns/pid")


def _zygotes(agent) -> list[int]:
    return [p for p in _spawner_processes(agent) if not _own_pidns(p, agent)]


def test_cgroup_created_joined_and_removed(agent, busybox_rootfs, container_id):
    cfg = make_spec(busybox_rootfs, ["sh", "-c", "grep -E '^[0-9]+:(memory|pids):' /proc/self/cgroup; read x"])
    cfg["linux"]["cgroupsPath"] = f"/kata-test/{container_id}"
    create(agent, container_id, cfg)
    agent.client.call("StartContainer", {"container_id": container_id})
    out = agent.client.call("ReadStdout", {"container_id": container_id, "len": 4096}).data.decode()
    paths = [line.split(":", 2) for line in out.split()]
    assert paths and all(p[2] == f"/kata-test/{container_id}" for p in paths), out
    dirs = [pathlib.Path("/sys/fs/cgroup") / ctrl / f"kata-test/{container_id}" for _, ctrl, _ in paths]
    assert all(d.is_dir() for d in dirs)
    agent.client.call("RemoveContainer", {"container_id": container_id})
    assert not any(d.exists() for d in dirs)


def _spawners(agent) -> list[int]:
    """The spawner processes among the agent's children (in the agent's PID namespace)."""
    return [p for p in _spawner_processes(agent) if _own_pidns(p, agent)]


def test_killed_spawner_is_replaced(agent, busybox_rootfs, container_id):
    """The OOM killer (here: SIGKILL) takes the container spawner: the agent starts a new one,
    and containers work again. The old spawner's zygote died with it (had it lived, the agent,
    a subreaper, would have adopted it, and it would show up here as a second spawner). The old
    PID 1 zygote, the agent's child, ends when the agent closes the old spawner's sockets."""
    [old] = _spawners(agent)
    old_zygotes = _zygotes(agent)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        now, zygotes = _spawners(agent), _zygotes(agent)
        if len(now) == 1 and now != [old] and len(zygotes) == 1 and zygotes != old_zygotes:
            break
        assert time.monotonic() < deadline, f"spawners: {now}, zygotes {zygotes}\n{agent.logs()[-2000:]}"
        time.sleep(0.05)
    assert "started a new one" in agent.logs()
    status, out, _ = sh(agent, container_id, busybox_rootfs, "echo back")
    assert (status, out) == (0, "back\n")
    assert _spawners(agent) == now


@pytest.mark.parametrize("cgroupns", [False, True])
def test_cgroup_mount_shows_the_container_its_own_cgroup(agent, busybox_rootfs, container_id, cgroupns):
    """/sys/fs/cgroup/memory inside is the container's own memory cgroup (its limit file, not the
    agent's kata-agent/ parent), with and without a cgroup namespace. In a cgroup namespace the
    hierarchies are mounted anew and rooted at the container's cgroup, as runc does; a bind of
    the agent's mount would show the whole tree there."""
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        pytest.skip("no cgroup v1 memory hierarchy here")
    cfg = make_spec(busybox_rootfs, ["sh", "-c", "ls /sys/fs/cgroup/memory; "
                                     "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
                                     "grep ':memory:' /proc/self/cgroup"])
    cfg["linux"]["resources"] = {"memory": {"limit": 64 << 20}}
    if cgroupns:
        cfg["linux"]["namespaces"].append({"type": "cgroup"})
    status, out, err = run(agent, container_id, cfg)
    assert status == 0, err
    lines = out.split()
    assert str(64 << 20) in lines, out                   # its own limit
    assert "kata-agent" not in lines and container_id not in lines, out
    own = [line for line in lines if ":memory:" in line]
    assert own == ([f"{own[0].split(':')[0]}:memory:/"] if cgroupns else
                   [f"{own[0].split(':')[0]}:memory:/kata-agent/{container_id}"]), out


def _in_cgroup_of(pid: int, container_id: str) -> bool:
    try:
        return f"/{container_id}" in pathlib.Path(f"/proc/{pid}/cgroup").read_text()
    except FileNotFoundError:
        return False


def _start_ticks(pid: int) -> int:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _now_ticks() -> int:
    return int(float(pathlib.Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def test_which_process_becomes_the_init(agent, busybox_rootfs, container_id):
    """v1 only: the init is the PID 1 zygote that waited before the request came, the agent's
    own child. As mounted (with a v2 cgroup): it is forked during the request, and adopted by the
    agent when its parent, the intermediate, exits. Both are PID 1 in the container."""
    v1_only = not os.path.ismount(f"/proc/{agent.pid}/root{UNIFIED}")
    time.sleep(0.3)  # the waiting zygote is 30 clock ticks old by now
    before = _now_ticks()
    create(agent, container_id, make_spec(busybox_rootfs, ["sh", "-c", "echo $$"]))
    # as mounted, the agent adopts the init when the intermediate has exited, which may lag the
    # reply under load
    deadline = time.monotonic() + 10
    while True:
        inits = [p for p in map(int, _children(agent.pid)) if _in_cgroup_of(p, container_id)]
        if inits or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    [init] = inits
    if v1_only:
        assert _start_ticks(init) < before - 10
    else:
        assert _start_ticks(init) >= before - 1
    agent.client.call("StartContainer", {"container_id": container_id})
    assert agent.client.call("WaitProcess", {"container_id": container_id}).status == 0
    assert read_all(agent, container_id) == b"1\n"
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_the_spawner_and_containers_leave_sched_idle(agent, busybox_rootfs, container_id):
    """The spawner imports under SCHED_IDLE (so that a guest's one vCPU serves the agent first)
    and takes the normal policy back once ready: its processes, and the containers they become,
    run SCHED_OTHER."""
    status, out, _ = sh(agent, container_id, busybox_rootfs, "grep ^policy /proc/self/sched")
    assert status == 0
    assert out.split()[-1] == str(os.SCHED_OTHER), out
    spawners = _spawner_processes(agent)
    assert spawners
    assert {os.sched_getscheduler(pid) for pid in spawners} == {os.SCHED_OTHER}
