"""Nobody on the network reaches the agent; the host does, over a virtio-serial channel.

One guest, booted as qemu/ boots it on this host (no vhost-vsock: the agent's channel is a
virtio-serial port), with a second network interface on a tap device in a network namespace the
test creates: an unrestricted network, as a pod's would be once UpdateInterface configured it.
From that network, port 1024 of the guest is closed while a port the guest does open answers;
over the serial channel a container lives its whole life under ttrpc and under gRPC, with a long
poll open beside other calls; a host that hangs up mid-frame leaves the next one served.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
import uuid

import pytest

from agent.protocols import agent_pb2, oci_pb2, types_pb2
from kata_agent_client.client import SERIAL_GAP, AgentClient
from kata_agent_client.spec import DEFAULT_ENV
from qemu.vm import Guest, qemu_binary
from tests.vm import helpers as h
from tests.vm.conftest import _ensure_image

MAC = "02:00:00:99:00:02"
GUEST_IP, HOST_IP = "10.99.0.2", "10.99.0.1"
OPEN_PORT = 2222


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def netns():
    name = f"kt-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        yield name
    finally:
        _ip("netns", "del", name)


@pytest.fixture(scope="module")
def guest(netns, tmp_path_factory):
    if qemu_binary("x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed: QEMU cannot run here")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun for the test network's tap device")
    _ensure_image("x86_64")
    root = tmp_path_factory.mktemp("channel")
    tap = "ktap0"
    g = Guest(arch="x86_64", accel=os.environ.get("KATA_VM_ACCEL", "auto"), channel="serial", netns=netns,
              debug_console=True, run_dir=root / "vm", name="test-channel", boot_timeout=150,
              extra_args=["-netdev", f"tap,id=net1,ifname={tap},script=no,downscript=no",
                          "-device", f"virtio-net-device,netdev=net1,mac={MAC}"])
    try:
        g.start()
        _ip("-n", netns, "addr", "add", f"{HOST_IP}/24", "dev", tap)
        _ip("-n", netns, "link", "set", tap, "up")
        yield g
    finally:
        g.cleanup()


def _in_netns(netns: str, code: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", code],
                       capture_output=True, text=True, timeout=60)
    return (r.stdout + r.stderr).strip()


def test_the_channel_is_serial_and_private(guest):
    assert guest.addr == f"serial://{guest.agent_socket}"
    assert oct(guest.run_dir.stat().st_mode & 0o777) == "0o700"
    for sock in (guest.agent_socket, guest.qmp_socket, guest.shell_socket):
        assert oct(sock.stat().st_mode & 0o777) == "0o600", sock
    rc, out = guest.shell("cat /proc/cmdline; cut -d' ' -f1 /proc/modules")
    assert rc == 0
    assert "agent.server_addr=serial:///dev/virtio-ports/agent.channel.0" in out, out
    assert "vsock_loopback" not in out.split(), out  # a container could reach the agent through it
    assert "hostfwd" not in (guest.run_dir / "qemu.cmdline").read_text()


def test_the_pod_network_does_not_reach_the_agent(guest, netns):
    with AgentClient(guest.addr, timeout=60) as c:
        iface = types_pb2.Interface(device="eth1", name="eth1", hwAddr=MAC, mtu=1500,
                                    IPAddresses=[types_pb2.IPAddress(address=GUEST_IP, mask="24")])
        c.agent.UpdateInterface(agent_pb2.UpdateInterfaceRequest(interface=iface), timeout=60)
    # something the guest does serve on that network, so that a refusal on 1024 means "closed"
    listener = (f"import socket; s = socket.socket(); s.bind(('0.0.0.0', {OPEN_PORT})); s.listen(); "
                f"c, _ = s.accept(); c.sendall(b'open'); c.close()")
    guest.shell(f"python3 -c \"{listener}\" >/dev/null 2>&1 &")
    probe = ("import socket, sys, time\n"
             "def ask(port):\n"
             "    try:\n"
             f"        s = socket.create_connection(('{GUEST_IP}', port), timeout=10)\n"
             "        return 'open:' + s.recv(10).decode()\n"
             "    except ConnectionRefusedError: return 'refused'\n"
             "    except OSError as e: return 'error:' + str(e)\n"
             "for _ in range(50):\n"
             f"    r = ask({OPEN_PORT})\n"
             "    if r.startswith('open'): break\n"
             "    time.sleep(0.2)\n"
             "print(r, ask(1024))\n")
    out = _in_netns(netns, probe)
    assert out == "open:open refused", out


@pytest.mark.parametrize("proto", ["ttrpc", "grpc"])
def test_a_container_lives_over_the_serial_channel(guest, proto, tmp_path_factory):
    rootfs = h.busybox_rootfs(tmp_path_factory.mktemp(f"rootfs-{proto}"))
    cid = h.new_id(proto)
    root = h.place_rootfs(guest.share_dir, rootfs, cid)
    with AgentClient(guest.addr, proto=proto, timeout=60) as c:
        s = c.agent
        s.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="serial", sandbox_id=f"sb-{proto}",
                                                       storages=[h.shared_storage()]), timeout=60)
        try:
            h.create(s, cid, ["sh", "-c", "read line; echo got:$line; sleep 600"], root)
            s.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
            waited = {}
            t = threading.Thread(target=lambda: waited.setdefault("status", h.wait(s, cid, timeout=120)))
            t.start()  # a long poll on the one connection ...
            s.WriteStdin(agent_pb2.WriteStreamRequest(container_id=cid, data=b"hello\n"), timeout=30)
            assert b"got:hello" in h.read_until(s, cid, b"got:hello")  # ... while other calls pass
            # an exec, which also shows the container has no virtio-serial port in its /dev
            proc = oci_pb2.Process(Args=["sh", "-c", "ls /dev; echo end-of-dev"], Env=DEFAULT_ENV, Cwd="/",
                                   User=oci_pb2.User())
            s.ExecProcess(agent_pb2.ExecProcessRequest(container_id=cid, exec_id="e1", process=proc), timeout=30)
            listing = h.read_until(s, cid, b"end-of-dev", exec_id="e1").decode()
            assert h.wait(s, cid, "e1") == 0
            assert "null" in listing.split() and not [d for d in listing.split() if d.startswith("vport")], listing
            assert c.health() == "SERVING"
            assert t.is_alive()
            s.SignalProcess(agent_pb2.SignalProcessRequest(container_id=cid, signal=9), timeout=30)
            t.join(60)
            assert waited["status"] == 137
            h.remove(s, cid)
        finally:
            s.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)


def test_a_host_that_hangs_up_mid_frame_leaves_the_next_served(guest):
    with AgentClient(guest.addr, timeout=30) as c:
        assert c.health() == "SERVING"
    time.sleep(SERIAL_GAP)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(guest.agent_socket))
    sock.sendall(struct.pack(">IIBB", 500, 1, 1, 0) + b"\x0a\x0bgrpc.Health")  # 13 of 500 bytes
    time.sleep(0.5)
    sock.close()
    time.sleep(SERIAL_GAP)
    for proto in ("grpc", "ttrpc"):
        with AgentClient(guest.addr, proto=proto, timeout=30) as c:
            assert c.health() == "SERVING"
