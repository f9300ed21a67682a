"""``kata-agent-ctl``: drive the agent from the host.

Commands live in kata_agent_client.commands, one module per area; each module has
``register(subparsers)`` that adds its sub-commands, each with ``func(args, client) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys

import grpc

from kata_agent_client import commands
from kata_agent_client.client import PROTOCOLS, AgentClient

ADDR_ENV = "KATA_AGENT_ADDR"


def default_addr() -> str | None:
    """The address from $KATA_AGENT_ADDR, else from the file a guest started by qemu/ wrote."""
    if os.environ.get(ADDR_ENV):
        return os.environ[ADDR_ENV]
    from kata_agent_client import guestfile

    return guestfile.guest_addr()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-agent-ctl", description="Drive a Kata-style guest agent.")
    p.add_argument("--addr", help="agent address: vsock://CID:PORT, serial:///PATH (QEMU's chardev socket), "
                                  "tcp://HOST:PORT, unix:///PATH "
                                  f"(default ${ADDR_ENV}, or the guest started by qemu/)")
    p.add_argument("--proto", choices=PROTOCOLS, default="ttrpc",
                   help="wire protocol (default ttrpc, as Kata's shims; the agent serves both)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-call timeout in seconds")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{mod.name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    addr = args.addr or default_addr()
    if not addr:
        print("kata-agent-ctl: no --addr given, no $KATA_AGENT_ADDR and no running guest found",
              file=sys.stderr)
        return 2
    try:
        with AgentClient(addr, timeout=args.timeout, proto=args.proto) as client:
            return args.func(args, client) or 0
    except grpc.RpcError as exc:
        print(f"kata-agent-ctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"kata-agent-ctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
