"""Guest-management RPCs that need a real guest (issue #6): clock, entropy, swap, details, metrics."""

from __future__ import annotations

import time

import grpc
import pytest

from agent.protocols import agent_pb2


def test_guest_details(agent_stub):
    reply = agent_stub.GetGuestDetails(agent_pb2.GuestDetailsRequest(mem_block_size=True,
                                                                      mem_hotplug_probe=True), timeout=10)
    d = reply.agent_details
    assert d.version and d.init_daemon  # the agent is the guest's PID 1
    assert d.supports_seccomp  # the image ships libseccomp2
    for handler in ("blk", "virtio-fs", "ephemeral", "local"):
        assert handler in d.storage_handlers, d.storage_handlers
    assert reply.mem_block_size_bytes > 0 and reply.mem_block_size_bytes % 4096 == 0


def test_get_metrics(agent_stub):
    text = agent_stub.GetMetrics(agent_pb2.GetMetricsRequest(), timeout=10).metrics
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert any(n.startswith("kata_agent") for n in names), sorted(names)[:20]
    assert any(n.startswith("kata_guest") for n in names), sorted(names)[:20]


def test_set_guest_date_time(guest, agent_stub):
    """Set the guest clock one hour ahead, read it back, then put it back."""
    now = time.time()
    target = int(now) + 3600
    agent_stub.SetGuestDateTime(agent_pb2.SetGuestDateTimeRequest(Sec=target, Usec=0), timeout=10)
    try:
        rc, out = guest.shell("date +%s")
        assert rc == 0 and abs(int(out.strip()) - target) < 30, out
    finally:
        t = time.time()
        agent_stub.SetGuestDateTime(agent_pb2.SetGuestDateTimeRequest(
            Sec=int(t), Usec=int((t % 1) * 1e6)), timeout=10)
    rc, out = guest.shell("date +%s")
    assert abs(int(out.strip()) - time.time()) < 30


def test_reseed_random_dev(guest, agent_stub):
    agent_stub.ReseedRandomDev(agent_pb2.ReseedRandomDevRequest(data=bytes(range(256)) * 2), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        agent_stub.ReseedRandomDev(agent_pb2.ReseedRandomDevRequest(data=b""), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_add_swap_path_on_loop_device(guest, agent_stub):
    """swap on a loop device over a file in the guest (tmpfs files cannot be swap themselves)."""
    rc, out = guest.shell("modprobe loop 2>/dev/null; dd if=/dev/zero of=/tmp/swapfile bs=1M count=16 2>/dev/null && "
                          "mkswap /tmp/swapfile >/dev/null && d=$(losetup -f) && losetup $d /tmp/swapfile && echo $d")
    if rc != 0 or not out.strip().startswith("/dev/loop"):
        pytest.fail(f"could not prepare a loop device in the guest: {out}")
    dev = out.strip().splitlines()[-1]
    try:
        agent_stub.AddSwapPath(agent_pb2.AddSwapPathRequest(path=dev), timeout=30)
        rc, swaps = guest.shell("cat /proc/swaps")
        assert dev in swaps, swaps
        with pytest.raises(grpc.RpcError) as e:
            agent_stub.AddSwapPath(agent_pb2.AddSwapPathRequest(path=dev), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        guest.shell(f"swapoff {dev}; losetup -d {dev}; rm -f /tmp/swapfile")


def test_add_swap_path_errors(agent_stub):
    for path, code in (("relative", grpc.StatusCode.INVALID_ARGUMENT),
                       ("/no/such/file", grpc.StatusCode.NOT_FOUND),
                       ("/proc", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            agent_stub.AddSwapPath(agent_pb2.AddSwapPathRequest(path=path), timeout=10)
        assert e.value.code() == code, (path, e.value.details())
