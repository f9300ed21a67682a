"""guest-details and metrics."""

from __future__ import annotations

from google.protobuf import json_format


def register(sub) -> None:
    p = sub.add_parser("guest-details", help="GetGuestDetails: agent version, handlers, memory hotplug")
    p.set_defaults(func=guest_details)
    p = sub.add_parser("metrics", help="GetMetrics: Prometheus text of the agent and the guest")
    p.set_defaults(func=metrics)


def guest_details(args, client) -> int:
    from kata_agent_client.cli import print_json

    reply = client.call("GetGuestDetails", {"mem_block_size": True, "mem_hotplug_probe": True})
    print_json(json_format.MessageToDict(reply, preserving_proto_field_name=True))
    return 0


def metrics(args, client) -> int:
    print(client.call("GetMetrics").metrics, end="")
    return 0
