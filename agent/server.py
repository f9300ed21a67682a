"""Builds the gRPC server, binds its listeners and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat

import grpc
from grpc_health.v1 import health as std_health
from grpc_health.v1 import health_pb2 as std_health_pb2
from grpc_health.v1 import health_pb2_grpc as std_health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent import rpc
from agent.config import Address, Config
from agent.context import Agent
from agent.protocols import agent_pb2, health_pb2
from agent.runtime.reaper import REAPER
from agent.service import KataHealth, add_service, build_agent_service
from agent.vsock import Relay, relay_backend_path, vsock_listener

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 << 20
SHUTDOWN_GRACE = 2.0
SERVICE_NAMES = (
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    std_health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


class ListenError(OSError):
    """A listen address could not be bound."""


class StartError(Exception):
    """An area's set-up failed (e.g. an invalid boot policy); the agent does not serve."""


def _prepare_unix(addr: Address) -> None:
    """Remove a stale socket file left by an earlier agent; refuse to replace anything else."""
    if addr.scheme != "unix" or addr.abstract:
        return
    try:
        st = os.lstat(addr.host)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{addr}: exists and is not a socket")
    os.unlink(addr.host)


def build_server(agent: Agent) -> tuple[grpc.aio.Server, std_health.aio.HealthServicer]:
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", 0),
    ])
    add_service(server, build_agent_service(agent), agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
    add_service(server, KataHealth(agent), health_pb2.DESCRIPTOR.services_by_name["Health"])
    standard = std_health.aio.HealthServicer()
    std_health_pb2_grpc.add_HealthServicer_to_server(standard, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    return server, standard


def bind(server: grpc.aio.Server, addrs: list[Address], run_dir: str) -> tuple[list[Address], list[Relay]]:
    """Bind every address; a TCP port 0 becomes the port the kernel chose.

    vsock addresses are served by relays (agent.vsock) into one private unix socket.
    """
    bound: list[Address] = []
    relays: list[Relay] = []
    backend = None
    for addr in addrs:
        if addr.scheme == "vsock":
            try:
                listener = vsock_listener(addr)
            except OSError as exc:
                raise ListenError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
            if backend is None:
                backend = relay_backend_path(run_dir)
                _prepare_unix(Address("unix", host=backend))
                server.add_insecure_port(f"unix:{backend}")
            relays.append(Relay(listener, backend, str(addr)))
            bound.append(addr)
            continue
        _prepare_unix(addr)
        try:
            port = server.add_insecure_port(addr.grpc_target())
        except RuntimeError:
            raise ListenError(f"cannot listen on {addr}") from None
        if addr.scheme == "tcp":
            addr = Address("tcp", host=addr.host, port=port)
        bound.append(addr)
    return bound, relays


async def serve(config: Config, spawner=None) -> int:
    agent = Agent(config=config, spawner=spawner)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)

    REAPER.install(loop)
    if spawner is not None:
        spawner.supervise()
    rpc.load_all()
    done = []
    relays: list[Relay] = []
    rc = 0
    try:
        for setup in rpc.SETUPS:
            try:
                await setup(agent)
            except Exception as exc:
                raise StartError(f"{setup.__module__}: {exc}") from exc
            done.append(setup.__module__)
        server, standard = build_server(agent)
        bound, relays = bind(server, config.server_addrs, config.run_dir)
        await server.start()
        for relay in relays:
            await relay.start()
        for name in ("", *SERVICE_NAMES[:2]):
            await standard.set(name, std_health_pb2.HealthCheckResponse.SERVING)
        log.info("agent serving", extra={"fields": {"addrs": [str(a) for a in bound], "pid": os.getpid()}})

        await agent.stopping.wait()
        log.info("agent stopping")
        await standard.enter_graceful_shutdown()
        for relay in relays:
            await relay.close()
        await server.stop(SHUTDOWN_GRACE)
    except (StartError, ListenError) as exc:
        log.error("agent cannot start", extra={"fields": {"error": str(exc)}})
        rc = 1
    finally:
        agent.stopping.set()
        for teardown in reversed(rpc.TEARDOWNS):
            if teardown.__module__ in done:
                try:
                    await teardown(agent)
                except Exception:  # noqa: BLE001 - release the rest too
                    log.exception("teardown failed", extra={"fields": {"area": teardown.__module__}})
    log.info("agent stopped")
    return rc
