"""agent.network in this process, its netlink socket opened inside a test network namespace."""

from __future__ import annotations

import asyncio

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent import network
from agent.errors import AgentError
from agent.protocols import types_pb2


class FailingIPRoute:
    """An IPRoute that refuses the ``fail_on``-th call of method ``name`` with EPERM."""

    def __init__(self, ipr: IPRoute, name: str, fail_on: int) -> None:
        self.ipr, self.name, self.left = ipr, name, fail_on

    def __getattr__(self, attr):
        real = getattr(self.ipr, attr)
        if attr != self.name:
            return real

        def call(command, *args, **kwargs):
            if command not in ("dump", "get"):
                self.left -= 1
                if self.left == 0:
                    raise NetlinkError(1, "injected")
            return real(command, *args, **kwargs)

        return call

    def close(self) -> None:
        self.ipr.close()


def run(coro):
    return asyncio.run(coro)


async def with_netlink(netns, fn, *args, factory=None, **kwargs):
    nl = network.Netlink(factory or (lambda: IPRoute(netns=netns.name)))
    try:
        return await fn(nl, *args, **kwargs)
    finally:
        await nl.close()


@pytest.fixture
def veth(netns):
    netns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    netns.ip("link", "set", "v0", "up")
    return netns


def neighbor(ip: str, mac: str) -> types_pb2.ARPNeighbor:
    return types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address=ip), device="v0", lladdr=mac)


def test_arp_neighbors_roll_back_added_and_restore_replaced(veth):
    veth.ip("neigh", "add", "10.8.0.5", "lladdr", "02:00:00:00:00:55", "dev", "v0", "nud", "permanent")
    before = veth.ip("neigh", "show", "dev", "v0")
    failing = lambda: FailingIPRoute(IPRoute(netns=veth.name), "neigh", fail_on=3)  # noqa: E731
    with pytest.raises(AgentError, match=r"neighbor 10\.8\.0\.7 dev v0: Operation not permitted"):
        run(with_netlink(veth, network.add_arp_neighbors, [
            neighbor("10.8.0.6", "02:00:00:00:00:06"),   # new: removed again
            neighbor("10.8.0.5", "02:00:00:00:00:66"),   # replaced: restored
            neighbor("10.8.0.7", "02:00:00:00:00:07"),   # fails
        ], factory=failing))
    assert veth.ip("neigh", "show", "dev", "v0") == before


def test_update_interface_by_pci_device_path(veth, tmp_path):
    (tmp_path / "bus/pci/devices/0000:00:07.0/net/v0").mkdir(parents=True)
    iface = types_pb2.Interface(devicePath="0000:00:07.0", name="eth7", mtu=1450)
    reply = run(with_netlink(veth, network.update_interface, iface, sysfs=str(tmp_path)))
    assert (reply.name, reply.mtu) == ("eth7", 1450)
    assert "eth7" in veth.ip("link", "show")


def test_update_interface_waits_for_a_hotplugged_link(veth, tmp_path):
    async def plug_later(nl):
        async def plug():
            await asyncio.sleep(0.3)
            veth.ip("link", "add", "late0", "address", "02:00:00:00:00:42", "type", "veth", "peer", "name", "late1")
        task = asyncio.create_task(asyncio.to_thread(lambda: asyncio.run(plug())))
        reply = await network.update_interface(nl, types_pb2.Interface(hwAddr="02:00:00:00:00:42"), timeout=5)
        await task
        return reply

    reply = run(with_netlink(veth, plug_later))
    assert reply.name == "late0" and reply.raw_flags & network.IFF_UP
