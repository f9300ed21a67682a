"""Interfaces, routes and ARP neighbours through netlink (pyroute2), and iptables through its tools.

pyroute2's IPRoute is synchronous, so one dedicated thread owns the netlink socket (``Netlink``)
and coroutines hand it small steps; the event loop never blocks and netlink state stays simple.
Every update registers an undo for each step, so a failure leaves the previous state in place.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import AgentError, AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound
from agent.netlink import Netlink
from agent.protocols import types_pb2
from agent.runtime import command
from agent.undo import UndoStack

if TYPE_CHECKING:  # pyroute2 is imported by the netlink thread on the first network RPC (9 MB, 1-2 s in a TCG guest)
    from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
IFF_UP = 0x1
NUD_PERMANENT = 0x80
IFNAMSIZ = 16
MAX_MTU = 65535
MIN_MTU = 68
_IFNAME = re.compile(r"[^/\s:]+")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
FAMILIES = {socket.AF_INET: types_pb2.v4, socket.AF_INET6: types_pb2.v6}
IPV6_LINK_LOCAL = ipaddress.ip_network("fe80::/64")


def _netlink_error_type() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


def netlink_error(what: str, exc: NetlinkError) -> AgentError:
    """A domain error naming ``what`` for a kernel refusal."""
    text = f"{what}: {os.strerror(exc.code)}"
    if exc.code == errno.EEXIST:
        return AlreadyExists(text)
    if exc.code in (errno.ENODEV, errno.ESRCH, errno.ENOENT):
        return NotFound(text)
    if exc.code in (errno.EINVAL, errno.ERANGE, errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return InvalidArgument(text)
    if exc.code == errno.EBUSY:
        return FailedPrecondition(text)
    return Internal(text)


async def step(nl: Netlink, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one netlink step; a kernel refusal becomes an error naming ``what``."""
    try:
        return await nl.run(fn, *args, **kwargs)
    except _netlink_error_type() as exc:  # evaluated only when a step fails
        raise netlink_error(what, exc) from None


# --- addresses -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    family: int
    address: str
    prefixlen: int

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


def parse_address(ip: types_pb2.IPAddress, where: str) -> Address:
    try:
        addr = ipaddress.ip_address(ip.address)
    except ValueError:
        raise InvalidArgument(f"{where}.address: {ip.address!r} is not an IP address") from None
    if ip.family == types_pb2.v6 and addr.version == 4:
        raise InvalidArgument(f"{where}.family: v6 but {ip.address} is an IPv4 address")
    bits = addr.max_prefixlen
    mask = ip.mask.strip()
    if not mask:
        prefixlen = bits
    elif mask.isdigit():
        prefixlen = int(mask)
    else:
        try:
            prefixlen = ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen if addr.version == 4 else -1
        except ValueError:
            prefixlen = -1
    if not 0 <= prefixlen <= bits:
        raise InvalidArgument(f"{where}.mask: {ip.mask!r} is not a prefix length or netmask for {addr}")
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return Address(family, addr.compressed, prefixlen)


def _addresses(ipr: IPRoute, index: int) -> list[Address]:
    """The link's addresses, but not IPv6 link-local ones: the kernel owns those."""
    out = []
    for msg in ipr.addr("dump", index=index):
        addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if msg["family"] == socket.AF_INET6 and ipaddress.ip_address(addr) in IPV6_LINK_LOCAL:
            continue
        out.append(Address(msg["family"], ipaddress.ip_address(addr).compressed, msg["prefixlen"]))
    return out


def _addr(ipr: IPRoute, command: str, index: int, a: Address) -> None:
    ipr.addr(command, index=index, address=a.address, prefixlen=a.prefixlen, family=a.family)


# --- links ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str
    mtu: int
    flags: int
    kind: str

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


def _link_of(msg) -> Link:
    info = msg.get("IFLA_LINKINFO")
    kind = (info.get("IFLA_INFO_KIND") if info else None) or ""
    return Link(msg["index"], msg.get("IFLA_IFNAME"), (msg.get("IFLA_ADDRESS") or "").lower(),
                msg.get("IFLA_MTU") or 0, msg["flags"], kind)


def _links(ipr: IPRoute) -> list[Link]:
    return sorted((_link_of(m) for m in ipr.link("dump")), key=lambda link: link.index)


def _link(ipr: IPRoute, index: int) -> Link:
    return _link_of(ipr.link("get", index=index)[0])


def _set_link(ipr: IPRoute, index: int, **attrs: Any) -> None:
    ipr.link("set", index=index, **attrs)


def _interface(ipr: IPRoute, link: Link) -> types_pb2.Interface:
    iface = types_pb2.Interface(device=link.name, name=link.name, mtu=link.mtu, hwAddr=link.mac,
                                type=link.kind, raw_flags=link.flags)
    for msg in ipr.addr("dump", index=link.index):
        iface.IPAddresses.add(family=FAMILIES.get(msg["family"], types_pb2.v4),
                              address=msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"),
                              mask=str(msg["prefixlen"]))
    return iface


def _list_interfaces(ipr: IPRoute) -> list[types_pb2.Interface]:
    return [_interface(ipr, link) for link in _links(ipr)]


def _read_interface(ipr: IPRoute, index: int) -> types_pb2.Interface:
    return _interface(ipr, _link(ipr, index))


async def list_interfaces(nl: Netlink) -> list[types_pb2.Interface]:
    return await nl.run(_list_interfaces)


def check_ifname(name: str, where: str) -> None:
    if len(name) >= IFNAMSIZ or not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(f"{where}: {name!r} is not a valid interface name "
                              f"(1 to {IFNAMSIZ - 1} characters, no '/', ':' or spaces)")


@dataclass(frozen=True)
class InterfaceUpdate:
    hw_addr: str
    device_path: str
    name: str
    mtu: int
    addresses: tuple[Address, ...]

    @property
    def label(self) -> str:
        key = f"hwAddr {self.hw_addr}" if self.hw_addr else f"devicePath {self.device_path}"
        return f"interface {self.name or '?'} ({key})"


def parse_interface(iface: types_pb2.Interface) -> InterfaceUpdate:
    """Validate an UpdateInterface request; nothing is touched yet."""
    mac = iface.hwAddr.strip().lower()
    if not mac and not iface.devicePath:
        raise InvalidArgument("interface: hwAddr or devicePath is required to find the link")
    if mac and not _MAC.fullmatch(mac):
        raise InvalidArgument(f"interface.hwAddr: {iface.hwAddr!r} is not a MAC address like 02:00:00:00:00:01")
    if iface.name:
        check_ifname(iface.name, "interface.name")
    if iface.mtu and not MIN_MTU <= iface.mtu <= MAX_MTU:
        raise InvalidArgument(f"interface.mtu: {iface.mtu} is outside {MIN_MTU}..{MAX_MTU}")
    addrs = tuple(parse_address(a, f"interface.IPAddresses[{i}]") for i, a in enumerate(iface.IPAddresses))
    return InterfaceUpdate(mac, iface.devicePath, iface.name, iface.mtu, addrs)


def _by_mac(ipr: IPRoute, mac: str) -> Link | None:
    return next((link for link in _links(ipr) if link.mac == mac), None)


def _by_name(ipr: IPRoute, name: str) -> Link | None:
    found = ipr.link_lookup(ifname=name)
    return _link(ipr, found[0]) if found else None


def pci_net_names(device_path: str, sysfs: str = "/sys") -> list[str]:
    """Interface names of a PCI device: a PCI path (``02/00``), a BDF, or a sysfs device path."""
    if device_path.startswith("/sys/"):
        base = os.path.join(sysfs, device_path[len("/sys/"):])
    elif re.fullmatch(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]", device_path):
        base = os.path.join(sysfs, "bus/pci/devices", device_path.lower())
    else:
        from agent import devices

        devpath = devices.pci_devpath(devices.parse_pci_path(device_path, "interface.devicePath"))
        if devpath is None:
            return []
        base = sysfs + devpath
    try:
        return sorted(os.listdir(os.path.join(base, "net")))
    except OSError:
        return []


async def find_link(nl: Netlink, want: InterfaceUpdate, timeout: float, sysfs: str = "/sys") -> Link:
    """The link the request names, waiting up to ``timeout`` for a hot-plugged device."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if want.hw_addr:
            link = await nl.run(_by_mac, want.hw_addr)
        else:
            names = pci_net_names(want.device_path, sysfs)
            link = await nl.run(_by_name, names[0]) if names else None
        if link is not None:
            return link
        if loop.time() >= deadline:
            raise NotFound(f"{want.label}: no such link")
        await asyncio.sleep(0.05)


async def update_interface(nl: Netlink, iface: types_pb2.Interface, *, timeout: float = 0.0,
                           sysfs: str = "/sys") -> types_pb2.Interface:
    want = parse_interface(iface)
    link = await find_link(nl, want, timeout, sysfs)
    label = f"interface {link.name} ({'hwAddr ' + link.mac if want.hw_addr else 'devicePath ' + want.device_path})"
    async with UndoStack() as undo:
        link = await _rename(nl, link, want.name, undo, label)
        await _set_mtu(nl, link, want.mtu, undo, label)
        await _replace_addresses(nl, link, want.addresses, undo, label)
        if not link.up:
            await step(nl, f"{label}: set up", _set_link, link.index, state="up")
            undo.push(f"{label}: down", lambda: nl.run(_set_link, link.index, state="down"))
    return await nl.run(_read_interface, link.index)


async def _rename(nl: Netlink, link: Link, name: str, undo: UndoStack, label: str) -> Link:
    if not name or name == link.name:
        return link
    if await nl.run(_by_name, name) is not None:
        raise AlreadyExists(f"{label}: cannot rename to {name}: a link with that name exists")
    if link.up:
        await step(nl, f"{label}: set down to rename", _set_link, link.index, state="down")
        undo.push(f"{label}: up", lambda: nl.run(_set_link, link.index, state="up"))
    await step(nl, f"{label}: rename to {name}", _set_link, link.index, ifname=name)
    undo.push(f"{label}: rename back", lambda: nl.run(_set_link, link.index, ifname=link.name))
    return replace(link, name=name, flags=link.flags & ~IFF_UP)


async def _set_mtu(nl: Netlink, link: Link, mtu: int, undo: UndoStack, label: str) -> None:
    if not mtu or mtu == link.mtu:
        return
    await step(nl, f"{label}: set mtu {mtu}", _set_link, link.index, mtu=mtu)
    undo.push(f"{label}: mtu back", lambda: nl.run(_set_link, link.index, mtu=link.mtu))


async def _replace_addresses(nl: Netlink, link: Link, wanted: tuple[Address, ...], undo: UndoStack,
                             label: str) -> None:
    current = await nl.run(_addresses, link.index)
    for a in current:
        if a not in wanted:
            await step(nl, f"{label}: remove address {a}", _addr, "del", link.index, a)
            undo.push(f"{label}: re-add {a}", lambda a=a: nl.run(_addr, "add", link.index, a))
    for a in dict.fromkeys(wanted):
        if a not in current:
            await step(nl, f"{label}: add address {a}", _addr, "add", link.index, a)
            undo.push(f"{label}: remove {a}", lambda a=a: nl.run(_addr, "del", link.index, a))


# --- routes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteSpec:
    """One main-table unicast route. ``key`` is what makes two routes the same for a replacement."""

    family: int
    dst: str  # "" for the default route
    dst_len: int
    gateway: str
    oif: int
    prefsrc: str
    scope: int
    flags: int
    mtu: int
    priority: int = 0
    proto: int = 3  # RTPROT_BOOT, as ip-route uses

    @property
    def key(self) -> tuple:
        return (self.family, self.dst, self.dst_len, self.gateway, self.oif, self.prefsrc, self.scope,
                self.mtu)

    def describe(self, devices: dict[int, str]) -> str:
        dest = f"{self.dst}/{self.dst_len}" if self.dst else "default"
        via = f" via {self.gateway}" if self.gateway else ""
        dev = f" dev {devices.get(self.oif, self.oif)}" if self.oif else ""
        return f"route {dest}{via}{dev}"


def _route_of(msg) -> RouteSpec | None:
    if msg.get("RTA_TABLE", msg["table"]) != RT_TABLE_MAIN or msg["type"] != RTN_UNICAST:
        return None
    metrics = msg.get("RTA_METRICS")
    mtu = (metrics.get("RTAX_MTU") if metrics else None) or 0
    return RouteSpec(msg["family"], msg.get("RTA_DST") or "", msg["dst_len"], msg.get("RTA_GATEWAY") or "",
                     msg.get("RTA_OIF") or 0, msg.get("RTA_PREFSRC") or "", msg["scope"], msg["flags"],
                     mtu, msg.get("RTA_PRIORITY") or 0, msg["proto"])


def _routes(ipr: IPRoute) -> list[RouteSpec]:
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        out.extend(r for r in map(_route_of, ipr.route("dump", family=family)) if r is not None)
    return out


def _managed(r: RouteSpec) -> bool:
    """Routes a replacement may delete: all but the kernel's IPv6 link-local prefix routes."""
    return not (r.family == socket.AF_INET6 and r.dst == "fe80::" and r.dst_len == 64)


def _route(ipr: IPRoute, command: str, r: RouteSpec) -> None:
    attrs: dict[str, Any] = {"family": r.family, "dst_len": r.dst_len, "table": RT_TABLE_MAIN,
                             "scope": r.scope, "proto": r.proto, "type": RTN_UNICAST}
    optional = {"dst": r.dst, "gateway": r.gateway, "oif": r.oif, "prefsrc": r.prefsrc, "flags": r.flags,
                "priority": r.priority}
    attrs.update({k: v for k, v in optional.items() if v})
    if r.mtu:
        attrs["metrics"] = {"mtu": r.mtu}
    ipr.route(command, **attrs)


def _device_names(ipr: IPRoute) -> dict[int, str]:
    return {link.index: link.name for link in _links(ipr)}


def _to_proto(r: RouteSpec, devices: dict[int, str]) -> types_pb2.Route:
    return types_pb2.Route(dest=f"{r.dst}/{r.dst_len}" if r.dst else "", gateway=r.gateway,
                           device=devices.get(r.oif, ""), source=r.prefsrc, scope=r.scope,
                           family=FAMILIES[r.family], flags=r.flags, mtu=r.mtu)


def _list_routes(ipr: IPRoute) -> list[types_pb2.Route]:
    devices = _device_names(ipr)
    return [_to_proto(r, devices) for r in _routes(ipr)]


async def list_routes(nl: Netlink) -> list[types_pb2.Route]:
    return await nl.run(_list_routes)


def _ip(text: str, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"{where}: {text!r} is not an IP address") from None


def parse_route(r: types_pb2.Route, where: str, devices: dict[str, int]) -> RouteSpec:
    """A validated RouteSpec for ``r``; ``devices`` maps interface names to indexes."""
    versions = set()
    if r.dest in ("", "default"):
        dst, dst_len = "", 0
    else:
        try:
            net = ipaddress.ip_network(r.dest, strict=False)
        except ValueError:
            raise InvalidArgument(f"{where}.dest: {r.dest!r} is not an address or ADDRESS/PREFIX") from None
        dst, dst_len = net.network_address.compressed, net.prefixlen
        versions.add(net.version)
        if dst_len == 0:
            dst = ""
    gateway = _ip(r.gateway, f"{where}.gateway") if r.gateway else None
    source = _ip(r.source, f"{where}.source") if r.source else None
    versions |= {a.version for a in (gateway, source) if a is not None}
    if r.family == types_pb2.v6:
        versions.add(6)
    if len(versions) > 1:
        raise InvalidArgument(f"{where}: mixes IPv4 and IPv6 (dest {r.dest!r}, gateway {r.gateway!r}, "
                              f"source {r.source!r}, family {types_pb2.IPFamily.Name(r.family)})")
    if not r.device and not gateway:
        raise InvalidArgument(f"{where}: a device or a gateway is required")
    oif = 0
    if r.device:
        if r.device not in devices:
            raise NotFound(f"{where}.device: no such link {r.device!r}")
        oif = devices[r.device]
    family = socket.AF_INET6 if 6 in versions else socket.AF_INET
    scope = r.scope
    if not gateway and scope == RT_SCOPE_UNIVERSE and family == socket.AF_INET:
        scope = RT_SCOPE_LINK  # as ip-route does for a route without a gateway
    if r.scope > 255 or r.mtu > MAX_MTU:
        raise InvalidArgument(f"{where}: scope {r.scope} or mtu {r.mtu} out of range")
    return RouteSpec(family, dst, dst_len, gateway.compressed if gateway else "", oif,
                     source.compressed if source else "", scope, r.flags, r.mtu)


def _link_routes_first(routes: list[RouteSpec]) -> list[RouteSpec]:
    return sorted(routes, key=lambda r: bool(r.gateway))


async def update_routes(nl: Netlink, routes: list[types_pb2.Route]) -> list[types_pb2.Route]:
    """Make the main table's unicast routes exactly ``routes`` (kernel IPv6 link-local ones stay)."""
    names = await nl.run(_device_names)
    indexes = {name: index for index, name in names.items()}
    wanted = [parse_route(r, f"routes[{i}]", indexes) for i, r in enumerate(routes)]
    wanted = list({r.key: r for r in wanted}.values())
    current = [r for r in await nl.run(_routes) if _managed(r)]
    wanted_keys = {r.key for r in wanted}
    current_keys = {r.key for r in current}
    stale = [r for r in current if r.key not in wanted_keys]
    new = [r for r in wanted if r.key not in current_keys]
    async with UndoStack() as undo:
        for r in reversed(_link_routes_first(stale)):
            await step(nl, f"{r.describe(names)}: delete", _route, "del", r)
            undo.push(f"{r.describe(names)}: restore", lambda r=r: nl.run(_route, "add", r))
        for r in _link_routes_first(new):
            await step(nl, f"{r.describe(names)}: add", _route, "add", r)
            undo.push(f"{r.describe(names)}: remove", lambda r=r: nl.run(_route, "del", r))
    return await list_routes(nl)


# --- ARP neighbours ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbor:
    family: int
    dst: str
    ifindex: int
    lladdr: str
    state: int
    flags: int


def parse_neighbor(n: types_pb2.ARPNeighbor, where: str, devices: dict[str, int]) -> Neighbor:
    ip = _ip(n.toIPAddress.address, f"{where}.toIPAddress.address")
    if not n.device:
        raise InvalidArgument(f"{where}.device: required")
    if n.device not in devices:
        raise NotFound(f"{where}.device: no such link {n.device!r}")
    lladdr = n.lladdr.strip().lower()
    if lladdr and not _MAC.fullmatch(lladdr):
        raise InvalidArgument(f"{where}.lladdr: {n.lladdr!r} is not a MAC address")
    if not 0 <= n.state <= 0xFFFF or not 0 <= n.flags <= 0xFF:
        raise InvalidArgument(f"{where}: state {n.state} or flags {n.flags} out of range")
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return Neighbor(family, ip.compressed, devices[n.device], lladdr, n.state or NUD_PERMANENT, n.flags)


def _neigh(ipr: IPRoute, command: str, n: Neighbor) -> None:
    attrs: dict[str, Any] = {"family": n.family, "dst": n.dst, "ifindex": n.ifindex, "state": n.state}
    if n.lladdr:
        attrs["lladdr"] = n.lladdr
    if n.flags:
        attrs["flags"] = n.flags
    ipr.neigh(command, **attrs)


def _existing_neighbor(ipr: IPRoute, n: Neighbor) -> Neighbor | None:
    for msg in ipr.neigh("dump", family=n.family, ifindex=n.ifindex):
        if msg.get("NDA_DST") == n.dst and msg["ifindex"] == n.ifindex:
            return Neighbor(n.family, n.dst, n.ifindex, msg.get("NDA_LLADDR") or "", msg["state"],
                            msg["flags"])
    return None


async def add_arp_neighbors(nl: Netlink, neighbors: list[types_pb2.ARPNeighbor]) -> None:
    indexes = {name: index for index, name in (await nl.run(_device_names)).items()}
    parsed = [parse_neighbor(n, f"neighbors[{i}]", indexes) for i, n in enumerate(neighbors)]
    async with UndoStack() as undo:
        for n, msg in zip(parsed, neighbors):
            what = f"neighbor {n.dst} dev {msg.device}"
            before = await nl.run(_existing_neighbor, n)
            await step(nl, what, _neigh, "replace", n)
            if before is None:
                undo.push(f"{what}: remove", lambda n=n: nl.run(_neigh, "del", n))
            else:
                undo.push(f"{what}: restore", lambda b=before: nl.run(_neigh, "replace", b))


# --- iptables ------------------------------------------------------------------------------------

IPTABLES_TIMEOUT = 30.0


def _iptables_tool(ipv6: bool, verb: str) -> str:
    name = f"{'ip6tables' if ipv6 else 'iptables'}-{verb}"
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise FailedPrecondition(f"{name}: not installed in this guest")
    return found


async def get_iptables(ipv6: bool) -> bytes:
    tool = _iptables_tool(ipv6, "save")
    done = await command.run([tool], timeout=IPTABLES_TIMEOUT)
    if done.returncode != 0:
        raise Internal(f"{os.path.basename(tool)}: {done.error_text()}")
    return done.stdout


async def set_iptables(ipv6: bool, rules: bytes) -> bytes:
    """Load ``rules`` with iptables-restore; if that fails, the previous rules are put back."""
    if not rules.strip():
        raise InvalidArgument("data: empty; expected iptables-save output")
    tool = _iptables_tool(ipv6, "restore")
    before = await get_iptables(ipv6)
    done = await command.run([tool], input=rules, timeout=IPTABLES_TIMEOUT)
    if done.returncode == 0:
        return done.stdout
    await command.run([tool], input=before, timeout=IPTABLES_TIMEOUT)
    raise InvalidArgument(f"data: {os.path.basename(tool)} refused the rules: {done.error_text()}")
