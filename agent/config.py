"""Agent settings: command-line flags, then the environment, then the kernel command line, then defaults.

Kept free of grpc imports: the agent reads its config first, as PID 1 before the guest is set up.
"""

from __future__ import annotations

import os
import re
import sys
from types import SimpleNamespace
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
    debug_console_vport: int = 0  # 0: no debug console on vsock
    log_vport: int = 0  # 0: logs only on stderr
    log_addr: Address | None = None  # where the log port listens: vsock://-1:<log_vport>, or --log-addr
    container_pipe_size: int = 0  # 0: the kernel's default pipe size
    dev_mode: bool = False
    unified_cgroup_hierarchy: bool = True  # cgroup2 at /sys/fs/cgroup; False: v1 hierarchies
    trace: bool = False  # accepted, not supported: logged at start
    run_dir: str = "/run"
    policy_file: str = ""
    # Kernel command line keys as read, for modules that want more (e.g. PID-1 set-up).
    cmdline: dict[str, str] = field(default_factory=dict)
    # What was wrong or ignored on the kernel command line; logged once logging is set up.
    notes: list[tuple[str, str]] = field(default_factory=list)  # (level, message)


def arg_parser():
    import argparse  # not when there are no flags (the guest's PID 1): 0.015 s of a TCG guest's boot

    p = argparse.ArgumentParser(prog="kata-agent", description="Kata-style guest agent")
    p.add_argument("--server-addr", action="append", metavar="ADDR",
                   help=f"listen address, repeatable (default {DEFAULT_SERVER_ADDR})")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    p.add_argument("--hotplug-timeout", type=float, metavar="SECONDS",
                   help=f"device wait bound (default {DEFAULT_HOTPLUG_TIMEOUT:g})")
    p.add_argument("--run-dir", metavar="DIR", help="state root holding kata-containers/ and sandbox-ns/")
    p.add_argument("--policy-file", metavar="FILE", help="JSON policy loaded at start")
    p.add_argument("--log-addr", metavar="ADDR",
                   help="also serve the JSON log lines to whoever connects here (agent.log_vport=PORT on the "
                        "kernel command line is vsock://-1:PORT)")
    p.add_argument("--cmdline-file", default="/proc/cmdline", help=argparse.SUPPRESS)
    return p


def no_flags() -> SimpleNamespace:
    """What arg_parser() makes of no flags at all, without argparse."""
    return SimpleNamespace(server_addr=None, log_level=None, hotplug_timeout=None, run_dir=None,
                           policy_file=None, log_addr=None, cmdline_file="/proc/cmdline")


def _timeout(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise ConfigError(f"{where}: {value:g} must be between 0 and 3600 seconds")
    return value


def _log_level(text: str, where: str) -> str:
    level = {"fatal": "critical", "panic": "critical"}.get(text, text)  # logrus names, as Kata maps them
    if level not in LOG_LEVELS:
        raise ConfigError(f"{where} {text!r}: expected one of {', '.join(LOG_LEVELS)}")
    return level


_BOOLS = {"": True, "1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def _bool(text: str) -> bool:
    """A bare key (``agent.devmode``) or ``=true/false/1/0/yes/no/on/off``."""
    if text.lower() not in _BOOLS:
        raise ConfigError("expected a bare key or true/false, 1/0, yes/no, on/off")
    return _BOOLS[text.lower()]


def _vsock_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 1 << 31:
        raise ConfigError("expected a vsock port from 1 to 2147483647")
    return int(text)


def _pipe_size(text: str) -> int:
    if not text.isdigit() or int(text) >= 1 << 31:
        raise ConfigError("expected a size in bytes, 0 or more (0: the kernel's default)")
    return int(text)


def _addresses(text: str) -> list[Address]:
    return [parse_address(a) for a in text.split(",") if a] or [parse_address(DEFAULT_SERVER_ADDR)]


# The agent.* keys of the kernel command line: the agent's own (parsed here), then those read by
# the PID-1 set-up (agent/init.py) and the guest image's /init. Any other agent.* key is ignored, as
# Kata's agent ignores keys it does not know (noted at debug level).
CMDLINE_KEYS = {
    "server_addr": _addresses,
    "log": lambda text: _log_level(text, "log level"),
    "hotplug_timeout": lambda text: _timeout(text.removesuffix("s"), "timeout"),
    "policy": str,
    "debug_console": _bool,
    "debug_console_vport": _vsock_port,
    "log_vport": _vsock_port,
    "container_pipe_size": _pipe_size,
    "devmode": _bool,
    "unified_cgroup_hierarchy": _bool,
    "trace": _bool,
}
PID1_KEYS = frozenset({"ip", "gw", "netdev", "modules", "debug_console_dev", "stub"})


def _cmdline_values(cmdline: dict[str, str], notes: list[tuple[str, str]]) -> dict[str, object]:
    """The known keys' values; a malformed one is left out (its default stays) and noted by name."""
    values: dict[str, object] = {}
    for key, text in cmdline.items():
        parse = CMDLINE_KEYS.get(key)
        if parse is None:
            if key not in PID1_KEYS:
                notes.append(("debug", f"agent.{key}: not a setting of this agent, ignored (as Kata's agent does)"))
            continue
        try:
            values[key] = parse(text)
        except (ConfigError, ValueError) as exc:
            notes.append(("error", f"kernel command line agent.{key}={text!r}: {exc}; the default is used"))
    return values


def from_cmdline(cmdline: dict[str, str]) -> Config:
    """Settings from the kernel command line's ``agent.*`` keys (prefix stripped) alone."""
    cfg = Config(cmdline=cmdline)
    boot = _cmdline_values(cmdline, cfg.notes)
    cfg.server_addrs = boot.get("server_addr", cfg.server_addrs)
    cfg.log_level = boot.get("log", "debug" if boot.get("devmode") else "info")  # devmode: debug, as Kata
    cfg.hotplug_timeout = boot.get("hotplug_timeout", DEFAULT_HOTPLUG_TIMEOUT)
    cfg.debug_console = boot.get("debug_console", False)
    cfg.debug_console_vport = boot.get("debug_console_vport", 0)
    cfg.log_vport = boot.get("log_vport", 0)
    if cfg.log_vport:
        cfg.log_addr = Address("vsock", cid=VMADDR_CID_ANY, port=cfg.log_vport)
    cfg.container_pipe_size = boot.get("container_pipe_size", 0)
    cfg.dev_mode = boot.get("devmode", False)
    cfg.unified_cgroup_hierarchy = boot.get("unified_cgroup_hierarchy", True)
    cfg.trace = boot.get("trace", False)
    if cfg.trace:
        cfg.notes.append(("warning", "agent.trace: tracing (OpenTelemetry) is not supported by this agent, ignored"))
    cfg.policy_file = boot.get("policy", "")
    return cfg


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Resolve settings with the precedence flag > environment > kernel command line > default.

    A bad flag or environment value raises ConfigError (someone typed it just now); a bad kernel
    command line value keeps its default and is noted in ``Config.notes``, so that the guest still
    boots and its agent reports what was wrong.
    """
    env = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else argv
    args = arg_parser().parse_args(argv) if argv else no_flags()
    cfg = from_cmdline(read_cmdline(args.cmdline_file))
    if args.server_addr:
        cfg.server_addrs = [parse_address(a) for a in args.server_addr]
    elif env.get("KATA_AGENT_SERVER_ADDR"):
        cfg.server_addrs = [parse_address(a) for a in env["KATA_AGENT_SERVER_ADDR"].split(",") if a]
    if args.log_level:
        cfg.log_level = _log_level(args.log_level, "log level")
    elif env.get("KATA_AGENT_LOG_LEVEL"):
        cfg.log_level = _log_level(env["KATA_AGENT_LOG_LEVEL"], "log level")
    if args.hotplug_timeout is not None:
        cfg.hotplug_timeout = _timeout(str(args.hotplug_timeout), "--hotplug-timeout")
    elif env.get("KATA_AGENT_HOTPLUG_TIMEOUT"):
        cfg.hotplug_timeout = _timeout(env["KATA_AGENT_HOTPLUG_TIMEOUT"], "KATA_AGENT_HOTPLUG_TIMEOUT")
    if args.log_addr:
        cfg.log_addr = parse_address(args.log_addr)
    cfg.run_dir = args.run_dir or env.get("KATA_AGENT_RUN_DIR") or "/run"
    cfg.policy_file = args.policy_file or env.get("KATA_AGENT_POLICY_FILE") or cfg.policy_file
    return cfg
