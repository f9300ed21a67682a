"""Network RPCs over gRPC, with the agent inside a network namespace this test created."""

from __future__ import annotations

import json

import grpc
import pytest

MAC = "02:00:00:aa:bb:01"


def links(netns) -> dict[str, dict]:
    return {link["ifname"]: link for link in json.loads(netns.ip("-j", "addr", "show"))}


def addrs(link: dict) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
            if not a["local"].startswith("fe80:")}


def routes(netns) -> str:
    return netns.ip("route", "show") + netns.ip("-6", "route", "show")


@pytest.fixture
def veth(netns):
    """v0 (MAC 02:00:00:aa:bb:01, 10.8.0.1/24) paired with v1, both down."""
    netns.ip("link", "add", "v0", "address", MAC, "type", "veth", "peer", "name", "v1")
    netns.ip("addr", "add", "10.8.0.1/24", "dev", "v0")
    return netns


def code_and_message(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return exc.code(), exc.details()


def update(client, **iface):
    return client.call_json("UpdateInterface", {"interface": iface})


def test_update_interface_by_hwaddr_renames_sets_mtu_addresses_and_up(veth, netns_agent):
    reply = update(netns_agent.client, hwAddr=MAC.upper(), name="eth1", mtu=1400,
                   IPAddresses=[{"address": "10.9.0.2", "mask": "24"},
                                {"family": "v6", "address": "fd00::2", "mask": "64"}])
    assert reply["name"] == "eth1" and reply["mtu"] == "1400" and reply["hwAddr"] == MAC
    assert {(a["address"], a["mask"]) for a in reply["IPAddresses"]} >= {("10.9.0.2", "24"), ("fd00::2", "64")}
    link = links(veth)["eth1"]
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    assert addrs(link) == {"10.9.0.2/24", "fd00::2/64"}  # 10.8.0.1/24 was replaced
    assert "v0" not in links(veth)


def test_update_interface_rolls_back_when_a_later_step_fails(veth, netns_agent):
    before = links(veth)["v0"]
    with pytest.raises(grpc.RpcError) as err:
        update(netns_agent.client, hwAddr=MAC, name="eth1", mtu=1400,
               IPAddresses=[{"address": "10.9.0.2", "mask": "24"},
                            {"family": "v6", "address": "ff02::5", "mask": "64"}])
    code, message = code_and_message(err.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "interface v0 (hwAddr 02:00:00:aa:bb:01): add address ff02::5/64" in message
    after = links(veth)
    assert "eth1" not in after
    assert after["v0"]["mtu"] == before["mtu"] and after["v0"]["flags"] == before["flags"]
    assert addrs(after["v0"]) == {"10.8.0.1/24"}


@pytest.mark.parametrize("iface, code, words", [
    ({"hwAddr": "02:00:00:00:00:99"}, grpc.StatusCode.NOT_FOUND, "hwAddr 02:00:00:00:00:99): no such link"),
    ({"hwAddr": MAC, "IPAddresses": [{"address": "10.9.0.300"}]}, grpc.StatusCode.INVALID_ARGUMENT,
     "interface.IPAddresses[0].address"),
    ({"hwAddr": MAC, "name": "a/b"}, grpc.StatusCode.INVALID_ARGUMENT, "interface.name"),
    ({"hwAddr": MAC, "name": "v1"}, grpc.StatusCode.ALREADY_EXISTS, "cannot rename to v1"),
    ({"name": "eth1"}, grpc.StatusCode.INVALID_ARGUMENT, "hwAddr or devicePath is required"),
])
def test_update_interface_bad_requests_change_nothing(veth, netns_agent, iface, code, words):
    before = links(veth)
    with pytest.raises(grpc.RpcError) as err:
        update(netns_agent.client, **iface)
    assert err.value.code() == code and words in err.value.details()
    assert links(veth) == before


def test_list_interfaces(veth, netns_agent):
    reply = netns_agent.client.call_json("ListInterfaces")
    by_name = {i["name"]: i for i in reply["Interfaces"]}
    assert set(by_name) == {"lo", "v0", "v1"}
    assert by_name["v0"]["hwAddr"] == MAC and by_name["v0"]["type"] == "veth"
    assert {"address": "10.8.0.1", "mask": "24"} in by_name["v0"]["IPAddresses"]


def up_with_addresses(netns) -> None:
    netns.ip("link", "set", "v0", "up")
    netns.ip("link", "set", "v1", "up")
    netns.ip("route", "add", "10.50.0.0/16", "dev", "v0")


def test_update_routes_replaces_the_table_link_routes_first(veth, netns_agent):
    up_with_addresses(veth)
    wanted = [  # gateway routes listed before the link route they need
        {"dest": "", "gateway": "10.8.0.254", "device": "v0"},
        {"dest": "10.20.0.0/16", "gateway": "10.8.0.253", "device": "v0", "mtu": 1300},
        {"dest": "10.8.0.0/24", "device": "v0", "source": "10.8.0.1", "scope": 253},
    ]
    reply = netns_agent.client.call_json("UpdateRoutes", {"routes": {"Routes": wanted}})
    got = {(r.get("dest", ""), r.get("gateway", ""), r.get("mtu", 0)) for r in reply["Routes"]
           if r.get("family", "v4") == "v4"}
    assert got == {("", "10.8.0.254", 0), ("10.20.0.0/16", "10.8.0.253", 1300), ("10.8.0.0/24", "", 0)}
    table = veth.ip("route", "show")
    assert "default via 10.8.0.254 dev v0" in table
    assert "10.20.0.0/16 via 10.8.0.253 dev v0" in table and "mtu 1300" in table
    assert "10.50.0.0/16" not in table  # not in the new table: removed
    listed = netns_agent.client.call_json("ListRoutes")
    assert listed == reply


def test_update_routes_rolls_back_on_a_failing_route(veth, netns_agent):
    up_with_addresses(veth)
    before = routes(veth)
    bad = [{"dest": "10.60.0.0/16", "device": "v0"},
           {"dest": "10.30.0.0/16", "gateway": "192.168.77.1", "device": "v0"}]
    with pytest.raises(grpc.RpcError) as err:
        netns_agent.client.call("UpdateRoutes", {"routes": {"Routes": bad}})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "route 10.30.0.0/16 via 192.168.77.1 dev v0: add" in err.value.details()
    assert routes(veth) == before


@pytest.mark.parametrize("route, code, words", [
    ({"dest": "10.1.0.0/16", "device": "nope0"}, grpc.StatusCode.NOT_FOUND, "routes[0].device: no such link"),
    ({"dest": "10.1.0.0/33", "device": "v0"}, grpc.StatusCode.INVALID_ARGUMENT, "routes[0].dest"),
    ({"dest": "10.1.0.0/16", "gateway": "fd00::1"}, grpc.StatusCode.INVALID_ARGUMENT, "mixes IPv4 and IPv6"),
    ({"dest": "10.1.0.0/16"}, grpc.StatusCode.INVALID_ARGUMENT, "a device or a gateway is required"),
])
def test_update_routes_bad_requests_change_nothing(veth, netns_agent, route, code, words):
    up_with_addresses(veth)
    before = routes(veth)
    with pytest.raises(grpc.RpcError) as err:
        netns_agent.client.call("UpdateRoutes", {"routes": {"Routes": [route]}})
    assert err.value.code() == code and words in err.value.details()
    assert routes(veth) == before


def test_add_arp_neighbors(veth, netns_agent):
    netns_agent.client.call("AddARPNeighbors", {"neighbors": {"ARPNeighbors": [
        {"toIPAddress": {"address": "10.8.0.7"}, "device": "v0", "lladdr": "02:00:00:00:00:07"},
        {"toIPAddress": {"address": "fd00::7", "family": "v6"}, "device": "v0",
         "lladdr": "02:00:00:00:00:08", "state": 0x80}]}})
    shown = veth.ip("neigh", "show", "dev", "v0")
    assert "10.8.0.7 lladdr 02:00:00:00:00:07 PERMANENT" in shown
    assert "fd00::7 lladdr 02:00:00:00:00:08 PERMANENT" in shown


def test_add_arp_neighbors_bad_device_changes_nothing(veth, netns_agent):
    with pytest.raises(grpc.RpcError) as err:
        netns_agent.client.call("AddARPNeighbors", {"neighbors": {"ARPNeighbors": [
            {"toIPAddress": {"address": "10.8.0.7"}, "device": "v0", "lladdr": "02:00:00:00:00:07"},
            {"toIPAddress": {"address": "10.8.0.8"}, "device": "eth9"}]}})
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "neighbors[1].device: no such link 'eth9'" in err.value.details()
    assert "10.8.0.7" not in veth.ip("neigh", "show")


RULES = b"""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -s 10.66.0.0/16 -j DROP
COMMIT
"""


@pytest.mark.parametrize("ipv6", [False, True])
def test_set_and_get_iptables(netns, netns_agent, ipv6):
    rules = RULES.replace(b"10.66.0.0/16", b"fd66::/64") if ipv6 else RULES
    netns_agent.client.call("SetIPTables", {"is_ipv6": ipv6, "data": __import__("base64").b64encode(rules).decode()})
    saved = netns_agent.client.call("GetIPTables", {"is_ipv6": ipv6}).data
    assert b":FORWARD DROP" in saved
    assert (b"-A INPUT -s fd66::/64 -j DROP" if ipv6 else b"-A INPUT -s 10.66.0.0/16 -j DROP") in saved
    tool = "ip6tables-save" if ipv6 else "iptables-save"
    assert b":FORWARD DROP" in netns.exec(tool).stdout


def test_set_iptables_refused_keeps_previous_rules(netns, netns_agent):
    import base64

    netns_agent.client.call("SetIPTables", {"data": base64.b64encode(RULES).decode()})
    with pytest.raises(grpc.RpcError) as err:
        netns_agent.client.call("SetIPTables", {"data": base64.b64encode(b"*filter\n-A NOPE -j WHAT\nCOMMIT\n").decode()})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "iptables-restore refused the rules" in err.value.details()
    assert b"-A INPUT -s 10.66.0.0/16 -j DROP" in netns.exec("iptables-save").stdout
