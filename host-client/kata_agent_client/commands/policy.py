"""set-policy FILE: replace the agent's policy (itself subject to the current policy)."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("set-policy", help="SetPolicy: replace the agent's JSON policy",
                       description="FILE is a JSON policy document; - reads stdin. "
                                   "It is checked locally for JSON syntax, and by the agent in full.")
    p.add_argument("file")
    p.set_defaults(func=set_policy)


def set_policy(args, client) -> int:
    text = sys.stdin.read() if args.file == "-" else open(args.file).read()
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{args.file}: not JSON: {exc}") from None
    client.call("SetPolicy", {"policy": text})
    print("policy replaced")
    return 0
