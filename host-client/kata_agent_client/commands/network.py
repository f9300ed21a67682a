"""ip and route: list and update the guest's interfaces and routes."""

from __future__ import annotations

import json
import sys

from google.protobuf import json_format


def register(sub) -> None:
    ip = sub.add_parser("ip", help="list or update guest interfaces")
    ip_sub = ip.add_subparsers(dest="ip_command", metavar="ACTION", required=True)
    p = ip_sub.add_parser("list", help="ListInterfaces")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.set_defaults(func=ip_list)
    p = ip_sub.add_parser("update", help="UpdateInterface: find a link by MAC or PCI path; set name, MTU, addresses")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--hwaddr", help="MAC address of the link")
    key.add_argument("--device-path", help="PCI path (02/00), BDF or /sys device path of the link")
    p.add_argument("--name", default="", help="new interface name")
    p.add_argument("--mtu", type=int, default=0)
    p.add_argument("--address", dest="addresses", action="append", default=[], metavar="IP/PREFIX",
                   help="address to have (repeatable; replaces the link's address set)")
    p.set_defaults(func=ip_update)

    route = sub.add_parser("route", help="list or replace guest routes")
    route_sub = route.add_subparsers(dest="route_command", metavar="ACTION", required=True)
    p = route_sub.add_parser("list", help="ListRoutes")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.set_defaults(func=route_list)
    p = route_sub.add_parser("update", help="UpdateRoutes: replace the route table",
                             description="FILE holds a JSON list of routes, e.g. "
                                         '[{"dest": "10.0.0.0/24", "device": "eth0"}, '
                                         '{"gateway": "10.0.0.1", "device": "eth0"}]; - reads stdin')
    p.add_argument("file")
    p.set_defaults(func=route_update)


def _reply_json(reply) -> dict:
    return json_format.MessageToDict(reply, preserving_proto_field_name=True)


def address_json(text: str) -> dict:
    address, _, prefix = text.partition("/")
    return {"family": "v6" if ":" in address else "v4", "address": address, "mask": prefix}


def format_interface(i: dict) -> str:
    addrs = " ".join(f"{a['address']}/{a.get('mask', '')}" for a in i.get("IPAddresses", []))
    return f"{i.get('name', ''):<16} {i.get('hwAddr', ''):<17} mtu {i.get('mtu', '0'):<6} {addrs}"


def format_route(r: dict) -> str:
    words = [r.get("dest") or "default"]
    for key, label in (("gateway", "via"), ("device", "dev"), ("source", "src"), ("scope", "scope"),
                       ("mtu", "mtu")):
        if r.get(key):
            words += [label, str(r[key])]
    return " ".join(words)


def _print_list(args, client, method: str, key: str, fmt) -> int:
    reply = _reply_json(client.call(method))
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        for item in reply.get(key, []):
            print(fmt(item))
    return 0


def ip_list(args, client) -> int:
    return _print_list(args, client, "ListInterfaces", "Interfaces", format_interface)


def ip_update(args, client) -> int:
    iface = {"hwAddr": args.hwaddr or "", "devicePath": args.device_path or "", "name": args.name,
             "mtu": args.mtu, "IPAddresses": [address_json(a) for a in args.addresses]}
    print(format_interface(_reply_json(client.call("UpdateInterface", {"interface": iface}))))
    return 0


def route_list(args, client) -> int:
    return _print_list(args, client, "ListRoutes", "Routes", format_route)


def route_update(args, client) -> int:
    text = sys.stdin.read() if args.file == "-" else open(args.file).read()
    try:
        routes = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{args.file}: not JSON: {exc}") from None
    if not isinstance(routes, list):
        raise ValueError(f"{args.file}: expected a JSON list of routes")
    reply = _reply_json(client.call("UpdateRoutes", {"routes": {"Routes": routes}}))
    for r in reply.get("Routes", []):
        print(format_route(r))
    return 0
