"""agent.network request parsing: pure checks that run before anything is touched."""

from __future__ import annotations

import socket

import pytest

from agent import network
from agent.errors import InvalidArgument, NotFound
from agent.protocols import types_pb2


@pytest.mark.parametrize("address, mask, expected", [
    ("10.0.0.2", "24", "10.0.0.2/24"),
    ("10.0.0.2", "255.255.0.0", "10.0.0.2/16"),
    ("10.0.0.2", "", "10.0.0.2/32"),
    ("FD00:0::2", "64", "fd00::2/64"),
])
def test_parse_address(address, mask, expected):
    assert str(network.parse_address(types_pb2.IPAddress(address=address, mask=mask), "a")) == expected


@pytest.mark.parametrize("ip, words", [
    (types_pb2.IPAddress(address="10.0.0.256"), "x.address: '10.0.0.256'"),
    (types_pb2.IPAddress(address="10.0.0.1", mask="33"), "x.mask: '33'"),
    (types_pb2.IPAddress(address="10.0.0.1", mask="255.0.255.0"), "x.mask"),
    (types_pb2.IPAddress(address="fd00::1", mask="255.255.255.0"), "x.mask"),
    (types_pb2.IPAddress(address="10.0.0.1", family=types_pb2.v6), "x.family: v6"),
])
def test_parse_address_errors_name_the_field(ip, words):
    with pytest.raises(InvalidArgument, match=words.replace(".", r"\.").replace("(", r"\(")):
        network.parse_address(ip, "x")


def test_parse_interface():
    want = network.parse_interface(types_pb2.Interface(
        hwAddr="02:AA:00:00:00:01", name="eth0", mtu=9000,
        IPAddresses=[types_pb2.IPAddress(address="10.0.0.1", mask="8")]))
    assert want.hw_addr == "02:aa:00:00:00:01" and want.name == "eth0" and want.mtu == 9000
    assert want.addresses == (network.Address(socket.AF_INET, "10.0.0.1", 8),)
    for bad, words in [({"hwAddr": "02:aa"}, "interface.hwAddr"),
                       ({"hwAddr": "02:aa:00:00:00:01", "mtu": 10}, "interface.mtu"),
                       ({"hwAddr": "02:aa:00:00:00:01", "name": "x" * 16}, "interface.name")]:
        with pytest.raises(InvalidArgument, match=words):
            network.parse_interface(types_pb2.Interface(**bad))


def test_parse_route():
    devices = {"eth0": 2}
    r = network.parse_route(types_pb2.Route(dest="default", gateway="10.0.0.1", device="eth0"), "r", devices)
    assert (r.dst, r.dst_len, r.gateway, r.oif, r.scope) == ("", 0, "10.0.0.1", 2, 0)
    link = network.parse_route(types_pb2.Route(dest="10.1.2.3/16", device="eth0"), "r", devices)
    assert (link.dst, link.dst_len, link.scope) == ("10.1.0.0", 16, network.RT_SCOPE_LINK)
    v6 = network.parse_route(types_pb2.Route(dest="fd00::/64", device="eth0", family=types_pb2.v6), "r", devices)
    assert v6.family == socket.AF_INET6 and v6.scope == 0
    with pytest.raises(InvalidArgument, match="r: mixes IPv4 and IPv6"):
        network.parse_route(types_pb2.Route(dest="10.0.0.0/8", device="eth0", family=types_pb2.v6), "r", devices)
    with pytest.raises(NotFound, match="r.device: no such link 'eth1'"):
        network.parse_route(types_pb2.Route(dest="10.0.0.0/8", device="eth1"), "r", devices)
    with pytest.raises(InvalidArgument, match="r.source"):
        network.parse_route(types_pb2.Route(device="eth0", source="nope"), "r", devices)


def test_parse_neighbor_defaults_to_permanent():
    n = network.parse_neighbor(types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.0.0.9"),
                                                     device="eth0", lladdr="02:00:00:00:00:09"), "n", {"eth0": 3})
    assert (n.dst, n.ifindex, n.state) == ("10.0.0.9", 3, network.NUD_PERMANENT)
    with pytest.raises(InvalidArgument, match="n.lladdr"):
        network.parse_neighbor(types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.0.0.9"),
                                                     device="eth0", lladdr="zz"), "n", {"eth0": 3})


def test_pci_net_names_from_fake_sysfs(tmp_path):
    dev = tmp_path / "devices/pci0000:00/0000:00:05.0"
    (dev / "net" / "eth3").mkdir(parents=True)
    (tmp_path / "bus/pci/devices").mkdir(parents=True)
    (tmp_path / "bus/pci/devices/0000:00:05.0").symlink_to(dev)
    assert network.pci_net_names("05", str(tmp_path)) == ["eth3"]
    assert network.pci_net_names("0000:00:05.0", str(tmp_path)) == ["eth3"]
    assert network.pci_net_names("/sys/devices/pci0000:00/0000:00:05.0", str(tmp_path)) == ["eth3"]
    assert network.pci_net_names("06", str(tmp_path)) == []
    with pytest.raises(InvalidArgument, match="interface.devicePath"):
        network.pci_net_names("zz/../x", str(tmp_path))
