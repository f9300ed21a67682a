"""Agent settings: command-line flags, then the environment, then the kernel command line, then defaults.

Kept free of grpc imports: the agent reads its config first, as PID 1 before the guest is set up.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field

from agent import linux

DEFAULT_SERVER_ADDR = "vsock://-1:1024"
DEFAULT_HOTPLUG_TIMEOUT = 3.0
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")
VMADDR_CID_ANY = 0xFFFFFFFF


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Address:
    """A listen or dial address: ``vsock://CID:PORT``, ``tcp://HOST:PORT``, ``unix:///path``,
    ``unix://@name`` or ``serial:///path``.

    ``serial://`` is a virtio-serial channel: in the guest the port's device
    (``/dev/virtio-ports/NAME``), on the host the unix socket of QEMU's chardev behind it.
    """

    scheme: str  # "vsock" | "tcp" | "unix" | "serial"
    host: str = ""  # tcp host, or the unix / serial path, or the abstract name
    port: int = 0
    cid: int = 0
    abstract: bool = False

    def grpc_target(self) -> str:
        """The address in the form grpcio's server and channel take."""
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{host}:{self.port}"
        if self.scheme == "unix":
            return f"unix-abstract:{self.host}" if self.abstract else f"unix:{self.host}"
        if self.scheme == "serial":  # the host's end: QEMU's chardev socket
            return f"unix:{self.host}"
        return f"vsock:{self.cid}:{self.port}"

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp://{host}:{self.port}"
        if self.scheme == "unix":
            return f"unix://@{self.host}" if self.abstract else f"unix://{self.host}"
        if self.scheme == "serial":
            return f"serial://{self.host}"
        cid = -1 if self.cid == VMADDR_CID_ANY else self.cid
        return f"vsock://{cid}:{self.port}"


def _port(text: str, addr: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"{addr!r}: port must be a number from 0 to 65535")
    return int(text)


def parse_address(addr: str) -> Address:
    scheme, sep, rest = addr.partition("://")
    if not sep:
        raise ConfigError(f"{addr!r}: expected vsock://CID:PORT, tcp://HOST:PORT, unix:///PATH or serial:///PATH")
    if scheme == "vsock":
        cid, sep, port = rest.rpartition(":")
        if not sep or not re.fullmatch(r"-1|\d+", cid):
            raise ConfigError(f"{addr!r}: expected vsock://CID:PORT with CID a number or -1")
        cid_num = VMADDR_CID_ANY if cid == "-1" else int(cid)
        if cid_num > VMADDR_CID_ANY:
            raise ConfigError(f"{addr!r}: CID out of range")
        return Address("vsock", cid=cid_num, port=_port(port, addr))
    if scheme == "tcp":
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\w+)|([^:\[\]]+):(\w+)", rest)
        if not m:
            raise ConfigError(f"{addr!r}: expected tcp://HOST:PORT (IPv6 as [ADDR]:PORT)")
        host = m.group(1) or m.group(3)
        return Address("tcp", host=host, port=_port(m.group(2) or m.group(4), addr))
    if scheme == "unix":
        if rest.startswith("@") and len(rest) > 1:
            return Address("unix", host=rest[1:], abstract=True)
        if rest.startswith("/") and "\0" not in rest:
            return Address("unix", host=rest)
        raise ConfigError(f"{addr!r}: expected unix:///ABSOLUTE/PATH or unix://@NAME")
    if scheme == "serial":
        if rest.startswith("/") and len(rest) > 1 and "\0" not in rest:
            return Address("serial", host=rest)
        raise ConfigError(f"{addr!r}: expected serial:///dev/virtio-ports/NAME (or, on the host, "
                          f"serial:///PATH/OF/THE/CHARDEV/SOCKET)")
    raise ConfigError(f"{addr!r}: unknown scheme {scheme!r} (vsock, tcp, unix or serial)")


def agent_keys(cmdline: dict[str, str]) -> dict[str, str]:
    """The ``agent.*`` keys of a parsed kernel command line, without the prefix."""
    return {key[len("agent."):]: value for key, value in cmdline.items() if key.startswith("agent.")}


def read_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    return agent_keys(linux.read_cmdline(path))


@dataclass
class Config:
    server_addrs: list[Address] = field(default_factory=lambda: [parse_address(DEFAULT_SERVER_ADDR)])
    log_level: str = "info"
    hotplug_timeout: float = DEFAULT_HOTPLUG_TIMEOUT
    debug_console: bool = False
    run_dir: str = "/run"
    policy_file: str = ""
    # Kernel command line keys as read, for modules that want more (e.g. PID-1 set-up).
    cmdline: dict[str, str] = field(default_factory=dict)


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-agent", description="Kata-style guest agent")
    p.add_argument("--server-addr", action="append", metavar="ADDR",
                   help=f"listen address, repeatable (default {DEFAULT_SERVER_ADDR})")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    p.add_argument("--hotplug-timeout", type=float, metavar="SECONDS",
                   help=f"device wait bound (default {DEFAULT_HOTPLUG_TIMEOUT:g})")
    p.add_argument("--run-dir", metavar="DIR", help="state root holding kata-containers/ and sandbox-ns/")
    p.add_argument("--policy-file", metavar="FILE", help="JSON policy loaded at start")
    p.add_argument("--cmdline-file", default="/proc/cmdline", help=argparse.SUPPRESS)
    return p


def _timeout(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise ConfigError(f"{where}: {value:g} must be between 0 and 3600 seconds")
    return value


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Resolve settings with the precedence flag > environment > kernel command line > default."""
    env = os.environ if environ is None else environ
    args = arg_parser().parse_args(argv)
    cmdline = read_cmdline(args.cmdline_file)
    cfg = Config(cmdline=cmdline)

    if args.server_addr:
        addrs = args.server_addr
    elif env.get("KATA_AGENT_SERVER_ADDR"):
        addrs = [a for a in env["KATA_AGENT_SERVER_ADDR"].split(",") if a]
    elif cmdline.get("server_addr"):
        addrs = [a for a in cmdline["server_addr"].split(",") if a]
    else:
        addrs = [DEFAULT_SERVER_ADDR]
    cfg.server_addrs = [parse_address(a) for a in addrs]

    level = args.log_level or env.get("KATA_AGENT_LOG_LEVEL") or cmdline.get("log") or "info"
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    cfg.log_level = level

    if args.hotplug_timeout is not None:
        cfg.hotplug_timeout = _timeout(str(args.hotplug_timeout), "--hotplug-timeout")
    elif env.get("KATA_AGENT_HOTPLUG_TIMEOUT"):
        cfg.hotplug_timeout = _timeout(env["KATA_AGENT_HOTPLUG_TIMEOUT"], "KATA_AGENT_HOTPLUG_TIMEOUT")
    elif cmdline.get("hotplug_timeout"):
        cfg.hotplug_timeout = _timeout(cmdline["hotplug_timeout"].rstrip("s"), "agent.hotplug_timeout")

    cfg.debug_console = "debug_console" in cmdline
    cfg.run_dir = args.run_dir or env.get("KATA_AGENT_RUN_DIR") or "/run"
    cfg.policy_file = args.policy_file or env.get("KATA_AGENT_POLICY_FILE") or cmdline.get("policy", "")
    return cfg
