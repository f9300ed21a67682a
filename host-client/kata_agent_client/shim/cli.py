"""The shim's command line, as containerd 1.6 calls it (runtime/v2/shim): Go-style flags
(``-namespace``, ``-address``, ``-publish-binary``, ``-id``, ``-bundle``, ``-debug``) and an
action, ``start`` or ``delete``; ``serve`` is the daemon ``start`` leaves behind. The working
directory is the bundle; TTRPC_ADDRESS names containerd's ttrpc socket for events.

containerd reads start's stdout and stderr together as the address, so ``start`` prints nothing
else, and the daemon gets neither: it logs to the bundle's ``log`` FIFO, which containerd copies
to its own log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from kata_agent_client.shim import BINARY, VERSION

log = logging.getLogger("kata_agent_client.shim")

LISTEN_FD_ENV = "KATA_SHIM_LISTEN_FD"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=BINARY, description="containerd runtime v2 shim running tasks in QEMU guests")
    for name in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        p.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), default="")
    p.add_argument("-debug", "--debug", action="store_true")
    p.add_argument("-v", "--version", action="store_true")
    p.add_argument("action", nargs="?", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.version:
        print(f"{BINARY}:\n  Version: {VERSION}\n  Runtime: io.containerd.kata-py.v2")
        return 0
    if args.action in ("start", "delete", "serve") and not (args.id and args.namespace and args.address):
        print(f"{args.action}: -id, -namespace and -address are required", file=sys.stderr)
        return 2
    if args.action == "start":
        return start(args)
    if args.action == "delete":
        return delete(args)
    if args.action == "serve":
        return serve(args)
    print(f"unknown action {args.action!r}: start or delete (containerd calls them)", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------ start

def start(args) -> int:
    from kata_agent_client.shim.sandbox import socket_address, socket_path

    address = socket_address(args.address, args.namespace, args.id)
    path = socket_path(address)
    if not path.startswith("\0"):
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.path.exists(path):
            if _can_connect(path):
                print(f"a shim already serves {address}", file=sys.stderr)
                return 1
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, 0o600)
        sock.listen(64)
        env = dict(os.environ, **{LISTEN_FD_ENV: str(sock.fileno())})
        argv = [sys.executable, "-m", "kata_agent_client.shim", "-namespace", args.namespace, "-id", args.id,
                "-address", args.address, "-publish-binary", args.publish_binary or "containerd"]
        if args.debug:
            argv.append("-debug")
        argv.append("serve")
        _write_address(Path.cwd() / "address", address)  # first: a shim nobody can find must not run
        with open(os.devnull, "r+b") as null:
            subprocess.Popen(argv, stdin=null, stdout=null, stderr=null, pass_fds=(sock.fileno(),),
                             env=env, start_new_session=True, cwd=os.getcwd())
    except BaseException:
        sock.close()
        if not path.startswith("\0"):
            Path(path).unlink(missing_ok=True)
        (Path.cwd() / "address").unlink(missing_ok=True)  # written, then the daemon did not start
        raise
    sock.close()
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0


def _can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.1)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _write_address(path: Path, address: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(address)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ delete

def delete(args) -> int:
    """After the shim died: remove its VM, mounts, socket and directory; print a DeleteResponse."""
    from kata_agent_client.shim.events import now
    from kata_agent_client.shim.protocols import ctd_shim_pb2 as pb
    from kata_agent_client.shim.sandbox import cleanup, run_dir, socket_address, socket_path

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(message)s")
    bundle = Path(args.bundle or os.getcwd())
    problems = cleanup(run_dir(args.address, args.namespace, args.id))
    address = socket_address(args.address, args.namespace, args.id)
    try:
        recorded = (bundle / "address").read_text().strip()
    except OSError:
        recorded = ""
    for addr in {address, recorded} - {""}:
        path = socket_path(addr)
        if not path.startswith("\0"):
            Path(path).unlink(missing_ok=True)
    for p in problems:
        print(p, file=sys.stderr)
    reply = pb.DeleteResponse(exit_status=128 + signal.SIGKILL, exited_at=now())
    sys.stdout.buffer.write(reply.SerializeToString())
    sys.stdout.flush()
    return 1 if problems else 0


# ------------------------------------------------------------------------------------ serve

def _record_timeline(task_id: str, timeline: dict) -> None:
    """One JSON line per task to $KATA_SHIM_TIMINGS, when set (bench/containerd.py reads it)."""
    import json

    path = os.environ.get("KATA_SHIM_TIMINGS")
    if path and timeline:
        with open(path, "a") as f:
            f.write(json.dumps({"id": task_id, "timeline": timeline}) + "\n")


def _setup_logging(debug: bool) -> None:
    stream = None
    try:  # containerd holds the log FIFO open for reading: this open does not block
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        stream = os.fdopen(fd, "w", buffering=1)
    except OSError:
        stream = open(os.devnull, "w")
    logging.basicConfig(stream=stream, level=logging.DEBUG if debug else logging.INFO,
                        format="time=%(asctime)s level=%(levelname)s msg=%(message)r runtime=kata-py")


def serve(args) -> int:
    _setup_logging(args.debug)
    fd = int(os.environ.pop(LISTEN_FD_ENV, "-1"))
    if fd < 0:
        log.error("serve: no listening socket passed")
        return 2
    listener = socket.socket(fileno=fd)
    code = 0
    try:
        asyncio.run(_serve(args, listener))
    except BaseException:  # noqa: BLE001 - logged; the process ends below either way
        log.exception("shim failed")
        code = 1
    logging.shutdown()
    os._exit(code)  # stdin threads may still block on a FIFO open: they must not hold the exit


async def _serve(args, listener: socket.socket) -> None:
    from agent import ttrpc
    from kata_agent_client.shim.events import Publisher
    from kata_agent_client.shim.sandbox import run_dir, socket_address, socket_path
    from kata_agent_client.shim.task import TaskService

    loop = asyncio.get_running_loop()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), args.namespace)
    service = TaskService(args.id, args.namespace, run_dir(args.address, args.namespace, args.id), publisher)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.shutdown.set)
    listener.setblocking(False)
    server = await loop.create_unix_server(lambda: ttrpc.ServerConnection(service.dispatch, name="shim"),
                                           sock=listener)
    log.info("serving %s for %s/%s", socket_address(args.address, args.namespace, args.id),
             args.namespace, args.id)
    try:
        await service.shutdown.wait()
        service.mark("shutdown")
        await asyncio.sleep(0.05)  # Shutdown's reply goes out first
    finally:
        server.close()
        await service.close()
        await publisher.flush()
        publisher.close()
        _record_timeline(args.id, service.timeline())
        path = socket_path(socket_address(args.address, args.namespace, args.id))
        if not path.startswith("\0"):
            Path(path).unlink(missing_ok=True)
        log.info("exiting")
