"""health, version, and call: any AgentService method with a JSON request."""

from __future__ import annotations

import sys

from google.protobuf import json_format

from kata_agent_client.client import AGENT_SERVICE


def register(sub) -> None:
    p = sub.add_parser("health", help="Kata grpc.Health/Check")
    p.set_defaults(func=health)
    p = sub.add_parser("version", help="agent and protocol versions")
    p.set_defaults(func=version)
    p = sub.add_parser("call", help="call any AgentService method with a JSON request",
                       description="Methods: " + ", ".join(sorted(m.name for m in AGENT_SERVICE.methods)))
    p.add_argument("method")
    p.add_argument("--json", default="{}", help="the request as JSON (protobuf JSON mapping); - reads stdin")
    p.set_defaults(func=call)


def health(args, client) -> int:
    status = client.health()
    print(status)
    return 0 if status == "SERVING" else 1


def version(args, client) -> int:
    from kata_agent_client.cli import print_json

    print_json(client.version())
    return 0


def call(args, client) -> int:
    text = sys.stdin.read() if args.json == "-" else args.json
    try:
        request = json_format.Parse(text, client.request_type(args.method)())
    except json_format.ParseError as exc:
        raise ValueError(f"--json: {exc}") from None
    reply = client.call(args.method, request)
    print(json_format.MessageToJson(reply, preserving_proto_field_name=True, indent=2) or "{}")
    return 0
