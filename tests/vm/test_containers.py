"""The sandbox and container lifecycle in the guest, over gRPC through hostfwd.

One sandbox for the module (hostname, DNS, the shared directory as a virtio-fs storage), busybox
containers whose rootfs is copied into the shared directory; the last test destroys the sandbox.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from agent.protocols import agent_pb2, oci_pb2
from kata_agent_client.bundle import write_config
from kata_agent_client.spec import DEFAULT_ENV, spec_from_config
from tests.vm import helpers as h

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stub(guest):
    with h.agent_stub(guest.addr) as s:
        yield s


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    return h.busybox_rootfs(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def sandbox(guest, stub, rootfs):
    if not guest.virtiofsd_proc:
        pytest.skip("no virtiofsd on this host: the shared directory cannot be exported")
    stub.CreateSandbox(agent_pb2.CreateSandboxRequest(
        hostname="vmtest", sandbox_id="vmtest", dns=h.DNS, storages=[h.shared_storage()]), timeout=60)
    cid = h.new_id("probe")
    try:
        h.run(stub, cid, ["true"], h.place_rootfs(guest.share_dir, rootfs, cid))
    except grpc.RpcError:
        stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
        raise
    finally:
        shutil.rmtree(Path(guest.share_dir) / cid, ignore_errors=True)
    return guest


@pytest.fixture
def ctr(sandbox, rootfs):
    """A fresh container id with its rootfs in the shared directory: (cid, root path in the guest)."""
    cid = h.new_id()
    yield cid, h.place_rootfs(sandbox.share_dir, rootfs, cid)
    shutil.rmtree(Path(sandbox.share_dir) / cid, ignore_errors=True)


def test_container_pid1_hostname_dns(stub, ctr):
    cid, root = ctr
    status, out, err = h.run(stub, cid, ["sh", "-c", "echo pid=$$; ps; hostname; cat /etc/resolv.conf; "
                                         "echo to-stderr >&2"], root)
    assert status == 0, (out, err)
    assert "pid=1" in out
    procs = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert procs[0][0] == "1" and "sh" in " ".join(procs[0]), out
    assert "\nvmtest\n" in out, out                       # the sandbox's UTS namespace
    assert "nameserver 10.0.2.3" in out and "search vm.test" in out, out
    assert err.strip() == "to-stderr"


def test_container_joins_sandbox_uts_and_exit_code(stub, ctr):
    """Containers of a sandbox share its UTS namespace (a pod's hostname), as in Kata."""
    cid, root = ctr
    status, out, _ = h.run(stub, cid, ["sh", "-c", "hostname; exit 7"], root, hostname="box1")
    assert status == 7
    assert out.strip() == "vmtest"


def test_resolv_conf_read_only(stub, ctr):
    cid, root = ctr
    status, out, _ = h.run(stub, cid, ["sh", "-c", "echo x >> /etc/resolv.conf && echo WROTE; true"], root)
    assert status == 0 and "WROTE" not in out


def test_host_file_in_shared_dir_seen_by_container(sandbox, stub, ctr):
    """virtio-fs: a file the host writes after CreateContainer is read by the container."""
    cid, root = ctr
    h.create(stub, cid, ["cat", "/from-host.txt"], root)
    try:
        (Path(sandbox.share_dir) / cid / "rootfs" / "from-host.txt").write_text("written on the host\n")
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        assert h.wait(stub, cid) == 0
        assert h.read_stream(stub, cid) == b"written on the host\n"
    finally:
        h.remove(stub, cid)


def _exec(stub, cid: str, exec_id: str, args: list[str], *, terminal: bool = False):
    proc = oci_pb2.Process(Args=args, Env=DEFAULT_ENV, Cwd="/", Terminal=terminal,
                           User=oci_pb2.User(UID=0, GID=0))
    stub.ExecProcess(agent_pb2.ExecProcessRequest(container_id=cid, exec_id=exec_id, process=proc), timeout=30)


def test_seccomp_profile_in_guest(stub, ctr, guest):
    """The guest's libseccomp turns mkdir into EPERM for this container only."""
    cid, root = ctr
    arches = {"x86_64": ["SCMP_ARCH_X86_64"], "aarch64": ["SCMP_ARCH_AARCH64"]}[guest.arch]
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": arches,
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    script = "mkdir /tmp/a && echo mkdir-ok || echo mkdir-failed; grep ^Seccomp: /proc/self/status"
    status, out, err = h.run(stub, cid, ["sh", "-c", script], root,
                             linux={**h.default_config(["true"])["linux"], "seccomp": profile})
    assert status == 0, (out, err)
    assert out.split("\n")[:2] == ["mkdir-failed", "Seccomp:\t2"], (out, err)


def test_cgroup_namespace_sees_own_cgroup_v2(stub, ctr):
    """Pure cgroup v2 in the guest: in a cgroup namespace /sys/fs/cgroup is a fresh cgroup2 mount
    rooted at the container's own cgroup (no kata-agent/ parent, its own memory.max)."""
    cid, root = ctr
    linux = h.default_config(["true"])["linux"]
    linux["namespaces"] = [*linux["namespaces"], {"type": "cgroup"}]
    linux["resources"] = {"memory": {"limit": 64 << 20}}
    status, out, err = h.run(stub, cid, ["sh", "-c", "cat /proc/self/cgroup; ls /sys/fs/cgroup; "
                                         "cat /sys/fs/cgroup/memory.max"], root, linux=linux)
    assert status == 0, (out, err)
    lines = out.split()
    assert lines[0] == "0::/", out
    assert "kata-agent" not in lines and "memory.max" in lines and str(64 << 20) in lines, out


def test_init_is_the_waiting_zygote_on_cgroup_v2(stub, ctr, guest):
    """The guest mounts cgroup2 with favordynmods, so moving a process into a v2 cgroup waits for
    no RCU grace period: the container's init is the PID 1 zygote that was waiting before the
    request (the short way), and it has moved itself into the container's v2 cgroup."""
    cid, root = ctr
    _, mounts = guest.shell("grep ' - cgroup2 ' /proc/self/mountinfo")
    assert "favordynmods" in mounts, mounts
    _, uptime = guest.shell("cat /proc/uptime")
    before = float(uptime.split()[0])
    time.sleep(0.3)
    h.create(stub, cid, ["sleep", "1000"], root)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        probe = textwrap.dedent("""\
            import glob, os
            for p in glob.glob("/proc/[0-9]*"):
                try:
                    if open(p + "/cmdline", "rb").read() == b"sleep\\x001000\\x00":
                        start = int(open(p + "/stat").read().rsplit(")", 1)[1].split()[19])
                        print(start / os.sysconf("SC_CLK_TCK"), open(p + "/cgroup").read().strip())
                except OSError:
                    pass
            """)
        code = base64.b64encode(probe.encode()).decode()
        _, out = guest.shell(f"python3 -c \"import base64; exec(base64.b64decode('{code}'))\"")
        started, cgroup = out.split()[:2]
        assert float(started) <= before, (out, before)   # born before the request: the zygote
        assert cgroup.startswith("0::/") and cgroup.endswith(cid), out
    finally:
        h.remove(stub, cid)


def test_exec_into_running_container(stub, ctr):
    cid, root = ctr
    h.create(stub, cid, ["sleep", "600"], root)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        _exec(stub, cid, "e1", ["sh", "-c", "echo exec-pid=$$; ps; exit 5"])
        assert h.wait(stub, cid, "e1") == 5
        out = h.read_stream(stub, cid, "e1").decode()
        assert "exec-pid=" in out and "exec-pid=1\n" not in out
        assert any(line.split()[:1] == ["1"] and "sleep 600" in line for line in out.splitlines()), out
        stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id=cid, signal=signal.SIGKILL), timeout=10)
        assert h.wait(stub, cid) == 137
    finally:
        h.remove(stub, cid)


def test_user_namespace_in_the_guest(stub, ctr):
    """A container with its ids mapped (0 -> 100000) in the sandbox: it joins the sandbox's UTS
    and IPC namespaces (the initial user namespace's) before its own, gets its mqueue, bound
    devices and its v2 cgroup, pivots on the initramfs guest, and an exec lands in its user
    namespace."""
    cid, root = ctr
    linux = h.default_config(["true"])["linux"]
    linux["namespaces"] = [*linux["namespaces"], {"type": "user"}]
    linux["uidMappings"] = linux["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    # a raised hard limit and a negative oom_score_adj need the initial user namespace's
    # CAP_SYS_RESOURCE: set before the container's user namespace is entered
    process = {**h.default_config(["sleep", "600"])["process"], "oomScoreAdj": -500}
    process["rlimits"] = [*process["rlimits"], {"type": "RLIMIT_RTPRIO", "hard": 7, "soft": 7}]
    h.create(stub, cid, ["sleep", "600"], root, linux=linux, process=process)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        _exec(stub, cid, "e1", ["sh", "-c", "cat /proc/self/uid_map; id; hostname; echo x > /dev/null && echo null-ok; "
                                             "grep -c ' /dev/mqueue ' /proc/self/mountinfo; cat /proc/self/cgroup; "
                                             "readlink /proc/self/ns/user; readlink /proc/1/ns/user; "
                                             "grep -c 'realtime priority *7 *7' /proc/1/limits; cat /proc/1/oom_score_adj"])
        assert h.wait(stub, cid, "e1") == 0
        lines = h.read_stream(stub, cid, "e1").decode().splitlines()
        assert lines[0].split() == ["0", "100000", "65536"], lines
        assert lines[1:5] == ["uid=0(root) gid=0(root)", "vmtest", "null-ok", "1"], lines
        assert lines[5].startswith("0::/") and lines[5].endswith(cid), lines
        assert lines[6] == lines[7] and lines[6].startswith("user:["), lines
        assert lines[8:] == ["1", "-500"], lines
    finally:
        h.remove(stub, cid)
    # runc's delegation: with a cgroup namespace and a writable cgroup mount, the v2 cgroup is
    # the process user's, who can make a sub-cgroup in it (and removes it: the agent does not)
    linux["namespaces"].append({"type": "cgroup"})
    cid2 = cid + "-d"
    cfg = h.default_config(["sh", "-c", "stat -c %u /sys/fs/cgroup; mkdir /sys/fs/cgroup/sub && "
                                        "rmdir /sys/fs/cgroup/sub && echo delegated"])
    cfg["root"]["path"], cfg["linux"] = root, linux
    cfg.pop("hostname")
    for m in cfg["mounts"]:
        if m["destination"] == "/sys/fs/cgroup":
            m["options"] = [o for o in m["options"] if o != "ro"]
    stub.CreateContainer(agent_pb2.CreateContainerRequest(container_id=cid2, exec_id=cid2,
                                                          OCI=spec_from_config(cfg)), timeout=60)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid2), timeout=30)
        status = h.wait(stub, cid2)
        out, err = h.read_stream(stub, cid2).decode(), h.read_stream(stub, cid2, stream="stderr").decode()
    finally:
        h.remove(stub, cid2)
    assert (status, out.split()) == (0, ["0", "delegated"]), (out, err)


def test_sigterm_reaches_trap_handler(stub, ctr):
    cid, root = ctr
    h.create(stub, cid, ["sh", "-c", "trap 'echo got-TERM; exit 42' TERM; echo ready; "
                                     "while :; do sleep 0.2; done"], root)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        h.read_until(stub, cid, b"ready")
        stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id=cid, signal=signal.SIGTERM), timeout=10)
        assert h.wait(stub, cid) == 42
        assert b"got-TERM" in h.read_stream(stub, cid)
    finally:
        h.remove(stub, cid)


def test_sigkill_gives_137(stub, ctr):
    cid, root = ctr
    h.create(stub, cid, ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.2; done"], root)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        h.read_until(stub, cid, b"ready")
        stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id=cid, signal=signal.SIGKILL), timeout=10)
        assert h.wait(stub, cid) == 137
    finally:
        h.remove(stub, cid)


def test_tty_session_winsize(stub, ctr):
    """A terminal container: TtyWinResize, then `stty size` and `tty` typed on its stdin."""
    cid, root = ctr
    h.create(stub, cid, ["sh"], root, terminal=True)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        stub.TtyWinResize(agent_pb2.TtyWinResizeRequest(container_id=cid, row=37, column=111), timeout=10)
        stub.WriteStdin(agent_pb2.WriteStreamRequest(
            container_id=cid, data=b"stty size; tty; echo done-$((6*7)); exit 4\n"), timeout=10)
        out = h.read_until(stub, cid, b"done-42")
        assert h.wait(stub, cid) == 4
        t0 = time.monotonic()
        out += h.read_stream(stub, cid, timeout=10)  # EOF once the terminal's last holder exits
        eof_seconds = time.monotonic() - t0
        text = out.decode(errors="replace")
        assert "37 111" in text, text
        assert "/dev/pts/" in text or "/dev/console" in text, text
        assert "\r\n" in text  # a terminal's line discipline, not a pipe
        assert eof_seconds < 2, f"ReadStdout EOF came {eof_seconds:.1f} s after the exit"
    finally:
        h.remove(stub, cid)


def test_tty_exec_winsize(stub, ctr):
    cid, root = ctr
    h.create(stub, cid, ["sleep", "600"], root)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        _exec(stub, cid, "t1", ["sh"], terminal=True)
        stub.TtyWinResize(agent_pb2.TtyWinResizeRequest(container_id=cid, exec_id="t1", row=12, column=34),
                          timeout=10)
        stub.WriteStdin(agent_pb2.WriteStreamRequest(container_id=cid, exec_id="t1",
                                                     data=b"stty size; echo fin-$((1+1)); exit 0\n"), timeout=10)
        out = h.read_until(stub, cid, b"fin-2", exec_id="t1")
        assert b"12 34" in out
        assert h.wait(stub, cid, "t1") == 0
    finally:
        h.remove(stub, cid)


def _bundle(tmp_path: Path, rootfs: Path, args: list[str]) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    write_config(bundle, args)
    return bundle


def test_cli_run_exec_kill_delete(sandbox, stub, rootfs, tmp_path):
    """What qemu/demo.sh does, through kata-agent-ctl: run --rm, run -d, exec, kill, wait, delete."""
    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kata_agent_client.cli", "--addr", sandbox.addr, *args],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    bundle = _bundle(tmp_path, rootfs, ["sh", "-c", "ps; cat /etc/resolv.conf; exit 2"])
    cid = h.new_id("cli")
    r = ctl("run", "--rm", "--shared-dir", str(sandbox.share_dir), "--bundle", str(bundle), cid)
    assert r.returncode == 2, r.stderr
    assert "nameserver 10.0.2.3" in r.stdout and r.stdout.splitlines()[1].split()[0] == "1", r.stdout
    assert not (Path(sandbox.share_dir) / cid).exists()  # --rm drops the rootfs copy

    cid = h.new_id("cli")
    write_config(bundle, ["sleep", "600"])
    try:
        r = ctl("run", "-d", "--shared-dir", str(sandbox.share_dir), "--bundle", str(bundle), cid)
        assert r.returncode == 0 and r.stdout.strip() == cid, r.stderr
        r = ctl("exec", cid, "--", "sh", "-c", "echo in-$(hostname); exit 9")
        assert r.returncode == 9 and r.stdout.strip() == "in-vmtest", (r.stdout, r.stderr)
        assert ctl("kill", cid, "KILL").returncode == 0
        r = ctl("wait", cid)
        assert r.stdout.strip() == "137", r.stderr
        assert ctl("delete", cid).returncode == 0
        assert ctl("delete", cid).returncode == 1  # NOT_FOUND now
    finally:
        h.remove(stub, cid)
        shutil.rmtree(Path(sandbox.share_dir) / cid, ignore_errors=True)


def test_cli_run_interactive_tty_in_tmux(sandbox, rootfs, tmp_path):
    """`kata-agent-ctl run -t ... sh` is an interactive shell, like `docker run -ti`."""
    tmux = shutil.which("tmux")
    if not tmux:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run("apt-get install -y -qq tmux || (apt-get update -qq && apt-get install -y -qq tmux)",
                           shell=True, capture_output=True, env=env, timeout=300)
        tmux = shutil.which("tmux")
        if not tmux:
            pytest.skip(f"tmux is not installed and apt-get install tmux failed: {r.stderr[-300:]!r}")
    bundle = _bundle(tmp_path, rootfs, ["sh"])
    cid = h.new_id("tty")
    ctl = [sys.executable, "-m", "kata_agent_client.cli", "--addr", sandbox.addr, "run", "-t", "--rm",
           "--shared-dir", str(sandbox.share_dir), "--bundle", str(bundle), cid]
    status_file = tmp_path / "status"
    shell_cmd = " ".join(_q(a) for a in ctl) + f"; echo $? > {_q(str(status_file))}; sleep 60"
    sock = f"kvmtest-{os.getpid()}"
    t = [tmux, "-L", sock]
    subprocess.run(t + ["new-session", "-d", "-x", "90", "-y", "25", "-s", "s", shell_cmd], check=True,
                   env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'host-client'}"})
    try:
        def pane() -> str:
            return subprocess.run(t + ["capture-pane", "-p", "-t", "s"], capture_output=True, text=True).stdout

        deadline = time.monotonic() + 30
        while "/ #" not in pane():
            assert time.monotonic() < deadline, f"no shell prompt:\n{pane()}"
            time.sleep(0.2)
        subprocess.run(t + ["send-keys", "-t", "s", "echo hello; tty; stty size; exit 3", "Enter"], check=True)
        sent = time.monotonic()
        deadline = sent + 30
        while not status_file.exists() or not status_file.read_text().strip():
            assert time.monotonic() < deadline, f"kata-agent-ctl did not return:\n{pane()}"
            time.sleep(0.1)
        returned_after = time.monotonic() - sent
        screen = pane()
        assert status_file.read_text().strip() == "3", screen
        lines = [line.strip() for line in screen.splitlines()]
        assert "hello" in lines, screen
        assert any(line.startswith("/dev/") for line in lines), screen   # tty names a terminal
        assert "25 90" in lines, screen                                  # the tmux window's size
        # The stdin pump stays blocked in read(); exiting must not wait for it.
        assert returned_after < 3, f"kata-agent-ctl returned {returned_after:.1f} s after the shell exited"
    finally:
        subprocess.run(t + ["kill-server"], capture_output=True)
        shutil.rmtree(Path(sandbox.share_dir) / cid, ignore_errors=True)


def _q(s: str) -> str:
    import shlex

    return shlex.quote(s)


def test_remove_unknown_container_is_not_found(stub, sandbox):
    with pytest.raises(grpc.RpcError) as e:
        stub.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="no-such"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_destroy_sandbox_unmounts_shared_dir(sandbox, stub):
    """Last in the module: DestroySandbox removes the sandbox's mounts and state."""
    stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
    rc, out = sandbox.shell("cat /proc/mounts")
    assert rc == 0
    assert " /run/kata-containers/shared/containers " not in out, out
    # a second sandbox can be created afterwards
    stub.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="again", sandbox_id="again"), timeout=60)
    stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
