"""The guest boots, PID 1 sets the machine up, and the agent answers over TCP (hostfwd)."""

from __future__ import annotations

import os
import uuid

import pytest

from qemu.vm import health_check


def test_kata_health_check(health_stub):
    from agent.protocols import health_pb2

    resp = health_stub.Check(health_pb2.CheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_kata_health_version(health_stub):
    from agent.protocols import health_pb2

    resp = health_stub.Version(health_pb2.CheckRequest(), timeout=10)
    assert resp.agent_version


def test_standard_health_service(agent_channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    resp = health_pb2_grpc.HealthStub(agent_channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_fresh_channel_health_helper(guest):
    assert health_check(guest.addr)


def test_pid1_mounts(guest):
    rc, out = guest.shell("cat /proc/mounts")
    assert rc == 0
    mounts = {line.split()[1]: line.split()[2] for line in out.splitlines() if len(line.split()) > 2}
    for path, fstype in {"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs", "/dev/pts": "devpts",
                         "/dev/shm": "tmpfs", "/run": "tmpfs", "/tmp": "tmpfs",
                         "/sys/fs/cgroup": "cgroup2"}.items():
        assert mounts.get(path) == fstype, (path, out)


def test_cgroup2_controllers_delegated(guest):
    rc, out = guest.shell("cat /sys/fs/cgroup/cgroup.subtree_control")
    assert rc == 0
    for c in ("cpu", "memory", "pids"):
        assert c in out.split(), out


def test_network_static_user_net(guest):
    rc, out = guest.shell("ip -4 addr show dev eth0; ip route show default")
    assert rc == 0
    assert "10.0.2.15/24" in out, out
    assert "default via 10.0.2.2" in out, out


def test_kernel_modules_loaded(guest):
    rc, out = guest.shell("cut -d' ' -f1 /proc/modules")
    assert rc == 0
    for m in ("virtio_net", "vmw_vsock_virtio_transport", "virtiofs", "virtio_blk"):
        assert m in out.split(), out


def test_overlay_autoloads(guest):
    rc, out = guest.shell("grep -w overlay /proc/filesystems")
    assert rc == 0, out


def test_virtiofs_share(guest):
    if not guest.virtiofsd_proc:
        pytest.skip("no virtiofsd on this host")
    name = f"probe-{uuid.uuid4().hex[:8]}"
    (guest.share_dir / name).write_text("from the host\n")
    rc, out = guest.shell(f"mkdir -p /mnt/vfs && mount -t virtiofs kataShared /mnt/vfs && "
                          f"cat /mnt/vfs/{name} && echo from-guest > /mnt/vfs/{name}.back; "
                          f"r=$?; umount /mnt/vfs; (exit $r)")  # the shell's status: the copy's
    assert rc == 0 and "from the host" in out, out
    assert (guest.share_dir / f"{name}.back").read_text() == "from-guest\n"


VSOCK_ECHO = r'''
import socket, threading
srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
srv.bind((socket.VMADDR_CID_ANY, 7777)); srv.listen(1)
def serve():
    c, _ = srv.accept(); c.sendall(c.recv(100).upper()); c.close()
threading.Thread(target=serve).start()
cl = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); cl.settimeout(10)
cl.connect((1, 7777)); cl.sendall(b"ping"); print("ECHO", cl.recv(100).decode())
'''


def test_vsock_loopback_in_guest(guest):
    """The guest kernel's vsock (CID 1, loopback transport) works: the base for vsock://. The
    loopback transport is not loaded at boot (through it, a container could reach the agent); the
    in-guest vsock tests load it."""
    rc, out = guest.shell(f"modprobe vsock_loopback && python3 -c '{VSOCK_ECHO}'", timeout=60)
    assert rc == 0 and "ECHO PING" in out, out


VSOCK_CALLS = r'''
import os, socket, sys, threading
sys.path.insert(0, "/usr/lib/kata-agent")
from agent import ttrpc
from agent.protocols import agent_pb2, health_pb2

def vsock():
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.connect((1, 1024))
    return s

# ttrpc, as a Kata shim speaks it
c = ttrpc.Client(vsock())
r = health_pb2.HealthCheckResponse.FromString(c.call("grpc.Health", "Check", b"", timeout=30))
d = agent_pb2.GuestDetailsResponse.FromString(
    c.call("grpc.AgentService", "GetGuestDetails", agent_pb2.GuestDetailsRequest(mem_block_size=True).SerializeToString(), timeout=30))
print("TTRPC", r.status, d.mem_block_size_bytes > 0)
c.close()

# gRPC: grpcio has no vsock, so a unix socket in this process is joined to vsock byte for byte
path = "/tmp/vsock-grpc.sock"
if os.path.exists(path):
    os.unlink(path)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); srv.bind(path); srv.listen(4)
def pipe(a, b):
    while (data := a.recv(65536)):
        b.sendall(data)
    b.shutdown(socket.SHUT_WR)
def accept():
    while True:
        u, _ = srv.accept(); v = vsock()
        threading.Thread(target=pipe, args=(u, v), daemon=True).start()
        threading.Thread(target=pipe, args=(v, u), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
import grpc
from agent.protocols import agent_pb2_grpc, health_pb2_grpc
with grpc.insecure_channel("unix:" + path) as ch:
    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.CheckRequest(), timeout=60)
    d = agent_pb2_grpc.AgentServiceStub(ch).GetGuestDetails(agent_pb2.GuestDetailsRequest(mem_block_size=True), timeout=60)
print("GRPC", r.status, d.mem_block_size_bytes > 0)
'''


def test_agent_serves_both_protocols_on_vsock_in_guest(guest):
    """Real calls inside the guest on vsock CID 1 port 1024, where Kata's shim connects: ttrpc,
    and gRPC on the same port (relayed in the test process, since grpcio has no vsock)."""
    rc, out = guest.shell(f"modprobe vsock_loopback && python3 -c '{VSOCK_CALLS}'", timeout=120)
    assert rc == 0 and "TTRPC 1 True" in out and "GRPC 1 True" in out, out


def test_boot_timeline_in_kernel_log(guest):
    """PID 1's start-up marks and slow imports are in the kernel's log, in the order of a boot
    (bench/vm_boot.py reads them there)."""
    if os.environ.get("KATA_VM_STUB") == "1":
        pytest.skip("the stub agent has its own marks")
    rc, out = guest.shell("dmesg | grep 'kata-boot: '")
    assert rc == 0, out
    marks = [line.split("kata-boot: mark ")[1].split()[0] for line in out.splitlines() if "kata-boot: mark " in line]
    wanted = ["init-start", "agent-main", "pid1-setup", "spawner-started"]
    assert [m for m in marks if m in wanted] == wanted, out
    assert "spawner-ready" in marks, out
    imports = [line for line in out.splitlines() if "kata-boot: import " in line]
    assert any(" import agent." in line and " s=" in line for line in imports), out


def test_machine_id_written_at_boot(guest):
    rc, out = guest.shell("cat /etc/machine-id")
    assert rc == 0 and len(out.split()[-1]) == 32 and int(out.split()[-1], 16) >= 0, out


def test_qmp(guest):
    assert guest.qmp("query-status")["status"] == "running"


@pytest.mark.parametrize("arch", ["aarch64"])
def test_other_arch_boots_to_health_check(guest_for, arch):
    arches = os.environ.get("KATA_VM_ARCHES", "x86_64,aarch64").split(",")
    if arch not in arches:
        pytest.skip(f"{arch} not in KATA_VM_ARCHES")
    g = guest_for(arch)
    assert health_check(g.addr, timeout=10)
    rc, out = g.shell("uname -m")
    assert rc == 0 and arch in out
