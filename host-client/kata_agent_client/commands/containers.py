"""Container lifecycle: run, create, start, exec, wait, kill, delete, stats, pause, resume."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import sys
import uuid

import grpc
from google.protobuf import json_format

from agent.protocols import agent_pb2, oci_pb2
from kata_agent_client import guestfile
from kata_agent_client.spec import DEFAULT_CAPS, DEFAULT_ENV, GUEST_SHARED, SHARE_TAG, shared_storage, spec_from_config
from kata_agent_client.stdio import ProcessIO, raw_terminal



def register(sub) -> None:
    for name, helptext in (("run", "create, start, attach and wait; like `runc run`"),
                           ("create", "create a container from an OCI bundle (it waits for start)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--bundle", "-b", default=".", help="bundle directory with config.json")
        p.add_argument("--tty", "-t", action="store_true", help="allocate a terminal (overrides config.json)")
        p.add_argument("--shared-dir", help="host directory the guest mounts at " + GUEST_SHARED +
                       "; the rootfs is copied there (default: the qemu/ guest's, if any)")
        p.add_argument("--sandbox-pidns", action="store_true", help="join the sandbox PID namespace")
        p.add_argument("--dns", action="append", default=[], metavar="LINE",
                       help="resolv.conf line for the sandbox it creates in the guest, repeatable "
                            "(e.g. 'nameserver 10.0.2.3')")
        p.add_argument("id", nargs="?", help="container id (default: a random one)")
        if name == "run":
            p.add_argument("--rm", action="store_true", help="remove the container when it exits")
            p.add_argument("--detach", "-d", action="store_true", help="start it and return")
        p.set_defaults(func=run if name == "run" else create)

    p = sub.add_parser("start", help="start a created container")
    p.add_argument("id")
    p.set_defaults(func=lambda a, c: _simple(c, "StartContainer", container_id=a.id))

    p = sub.add_parser("exec", help="run a command in a container")
    p.add_argument("--tty", "-t", action="store_true")
    p.add_argument("--env", "-e", action="append", default=[], help="NAME=VALUE, repeatable")
    p.add_argument("--cwd", default="/")
    p.add_argument("--user", "-u", default="0:0", help="UID[:GID]")
    p.add_argument("--exec-id", help="default: a random one")
    p.add_argument("id")
    p.add_argument("cmd", nargs="+")
    p.set_defaults(func=exec_)

    p = sub.add_parser("wait", help="wait for a process and print its exit code")
    p.add_argument("--exec-id", default="")
    p.add_argument("id")
    p.set_defaults(func=wait)

    p = sub.add_parser("kill", help="send a signal (default TERM); KILL to the container kills all its processes")
    p.add_argument("--exec-id", default="")
    p.add_argument("id")
    p.add_argument("signal", nargs="?", default="TERM")
    p.set_defaults(func=kill)

    p = sub.add_parser("delete", help="remove a container (killing what remains)")
    p.add_argument("--timeout", type=int, default=10, help="seconds to wait for it to go")
    p.add_argument("id")
    p.set_defaults(func=lambda a, c: _simple(c, "RemoveContainer", container_id=a.id, timeout=a.timeout))

    for name, method in (("pause", "PauseContainer"), ("resume", "ResumeContainer")):
        p = sub.add_parser(name, help=f"{name} every process of a container")
        p.add_argument("id")
        p.set_defaults(func=lambda a, c, m=method: _simple(c, m, container_id=a.id))

    p = sub.add_parser("stats", help="cgroup statistics as JSON")
    p.add_argument("id")
    p.set_defaults(func=stats)


def _simple(client, method: str, **fields) -> int:
    client.call(method, fields)
    return 0


def signal_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {text!r}") from None


def load_bundle(bundle: str) -> tuple[dict, pathlib.Path]:
    path = pathlib.Path(bundle).resolve()
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}/config.json: not found (an OCI bundle has one)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}/config.json: {exc}") from None
    return config, path


def _place_rootfs(config: dict, bundle: pathlib.Path, cid: str, shared_dir: str | None) -> str:
    """The Root.Path the agent should see: local, or a copy in the guest's shared directory."""
    root = pathlib.Path(config.get("root", {}).get("path", "rootfs"))
    if not root.is_absolute():
        root = bundle / root
    if not shared_dir:
        return str(root)
    dest = pathlib.Path(shared_dir) / cid / "rootfs"
    if dest.exists():
        raise ValueError(f"{dest}: exists already (is {cid} in use?)")
    dest.parent.mkdir(parents=True)
    shutil.copytree(root, dest, symlinks=True)
    return f"{GUEST_SHARED}/{cid}/rootfs"


def shared_dir(args) -> tuple[str | None, str]:
    """The host directory shared with the guest, and its virtio-fs tag."""
    info = guestfile.read_guest() or {}
    if args.shared_dir is not None:
        return args.shared_dir, info.get("share_tag", SHARE_TAG)
    return info.get("shared_dir"), info.get("share_tag", SHARE_TAG)


def ensure_sandbox(client, tag: str, hostname: str, dns: list[str]) -> None:
    """CreateSandbox with the shared directory as a virtio-fs storage, unless one exists."""
    request = agent_pb2.CreateSandboxRequest(
        hostname=hostname, sandbox_id="kata-agent-ctl", dns=dns,
        storages=[shared_storage(tag)])
    try:
        client.call("CreateSandbox", request)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def build_request(args, config: dict, bundle: pathlib.Path, cid: str) -> agent_pb2.CreateContainerRequest:
    if args.tty:
        config.setdefault("process", {})["terminal"] = True
    shared, _tag = shared_dir(args)
    config.setdefault("root", {})["path"] = _place_rootfs(config, bundle, cid, shared)
    spec = spec_from_config(config)
    return agent_pb2.CreateContainerRequest(container_id=cid, exec_id=cid, OCI=spec,
                                            sandbox_pidns=args.sandbox_pidns)


def _create(args, client) -> tuple[str, agent_pb2.CreateContainerRequest]:
    config, bundle = load_bundle(args.bundle)
    cid = args.id or uuid.uuid4().hex[:12]
    shared, tag = shared_dir(args)
    if shared:
        ensure_sandbox(client, tag, config.get("hostname") or "sandbox", args.dns)
    request = build_request(args, config, bundle, cid)
    try:
        client.call("CreateContainer", request)
    except BaseException:
        _drop_rootfs_copy(shared, cid)
        raise
    return cid, request


def _drop_rootfs_copy(shared: str | None, cid: str) -> None:
    if shared:
        shutil.rmtree(pathlib.Path(shared) / cid, ignore_errors=True)


def create(args, client) -> int:
    cid, _ = _create(args, client)
    print(cid)
    return 0


def run(args, client) -> int:
    cid, request = _create(args, client)
    terminal = request.OCI.Process.Terminal
    try:
        io = ProcessIO(client, cid, tty=terminal)
        if args.detach:
            client.call("StartContainer", {"container_id": cid})
            print(cid)
            return 0
        with raw_terminal(terminal):
            io.start(stdin=not sys.stdin.closed)
            client.call("StartContainer", {"container_id": cid})
            code = io.wait()
        return code
    finally:
        if args.rm and not args.detach:
            client.call("RemoveContainer", {"container_id": cid, "timeout": 10})
            _drop_rootfs_copy(shared_dir(args)[0], cid)


def exec_(args, client) -> int:
    uid, _, gid = args.user.partition(":")
    process = oci_pb2.Process(
        Terminal=args.tty, Args=args.cmd, Env=DEFAULT_ENV + args.env, Cwd=args.cwd,
        User=oci_pb2.User(UID=int(uid), GID=int(gid or 0)),
        Capabilities=oci_pb2.LinuxCapabilities(Bounding=DEFAULT_CAPS, Effective=DEFAULT_CAPS,
                                               Permitted=DEFAULT_CAPS, Ambient=DEFAULT_CAPS),
        NoNewPrivileges=True)
    if args.tty:
        size = shutil.get_terminal_size()
        process.ConsoleSize.Height, process.ConsoleSize.Width = size.lines, size.columns
    exec_id = args.exec_id or uuid.uuid4().hex[:12]
    io = ProcessIO(client, args.id, exec_id, tty=args.tty)
    with raw_terminal(args.tty):
        client.call("ExecProcess", agent_pb2.ExecProcessRequest(container_id=args.id, exec_id=exec_id,
                                                                process=process))
        io.start()
        return io.wait()


def wait(args, client) -> int:
    reply = client.call("WaitProcess", {"container_id": args.id, "exec_id": args.exec_id}, timeout=None)
    print(reply.status)
    return 0


def kill(args, client) -> int:
    client.call("SignalProcess", {"container_id": args.id, "exec_id": args.exec_id,
                                  "signal": signal_number(args.signal)})
    return 0


def stats(args, client) -> int:
    reply = client.call("StatsContainer", {"container_id": args.id})
    print(json_format.MessageToJson(reply, preserving_proto_field_name=True, indent=2))
    return 0
