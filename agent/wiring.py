"""How the agent is put together: ``run`` builds every component, in order, serves, and tears
them down in reverse.

    config -> policy -> services and listeners (Health answers) -> metrics -> runtime
           -> uevent listener -> sandbox -> netlink -> the AgentService handlers (agent.rpc.*)

agent.__main__ reads the config and starts the spawner (before anything can start a thread);
everything else is built here. The listeners come first, with what Kata's Health needs (the
service table, ttrpc, protobuf): a runtime asks Health until it answers, so the agent answers
as soon as it can; the other components and the RPC areas are imported and built right after,
their modules imported in a thread while the event loop answers Health, and an AgentService call
that comes meanwhile waits for them (agent.service). The RPC areas (agent.rpc.*) build nothing: they use
what is on the Agent (agent.context).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from agent import boottrace
from agent.bootpolicy import BootPolicy
from agent.config import Config
from agent.context import Agent
from agent.errors import AgentError
from agent.runtime.reaper import REAPER
from agent.runtime.spawner import Spawner
from agent.server import Front, ListenError
from agent.service import Services
from agent.undo import UndoStack

if TYPE_CHECKING:
    from agent.policy import PolicyHolder
    from agent.rpc import Handler
    from agent.runtime.container import Runtime
    from agent.uevent import UeventListener

log = logging.getLogger(__name__)


class StartError(Exception):
    """A component could not be built (e.g. an invalid boot policy); the agent does not serve."""


def all_handlers() -> dict[str, Handler]:
    """Every RPC handler, by AgentService method name (imports the RPC areas)."""
    from agent.rpc import containers, guest, handlers, network, resources
    from agent.rpc import sandbox as sandbox_rpc

    return handlers(containers, resources, sandbox_rpc, network, guest)


def boot_policy(boot: BootPolicy) -> PolicyHolder | None:
    """The boot policy (parsed once, perhaps already by PID 1's set-up), else None (allow-all:
    agent.policy is then imported by the first SetPolicy, 0.03 s of a TCG guest's boot); a bad
    one is a StartError."""
    try:
        parsed = boot.get()
    except (OSError, AgentError) as exc:  # PolicyError, or no Rego engine here (FAILED_PRECONDITION)
        message = exc.message if isinstance(exc, AgentError) else f"{boot.value}: {exc.strerror}"
        raise StartError(f"policy at boot: {message}") from None
    if parsed is None:
        return None
    from agent import policy

    log.info("policy loaded", extra={"fields": {"source": boot.source, "rules": len(parsed.rules)}})
    return policy.PolicyHolder(parsed)


def uevent_listener() -> UeventListener | None:
    from agent.uevent import UeventListener

    listener = UeventListener()
    try:
        listener.start()
    except OSError as exc:  # no netlink (unprivileged): device waits poll sysfs instead
        log.warning("no uevent listener: %s", exc)
        return None
    return listener


# What build() imports, in a thread of its own: the event loop answers Health meanwhile (the
# thread holds the GIL for at most Python's switch interval, 5 ms, at a time).
BUILD_MODULES = ("agent.metrics", "agent.runtime.container", "agent.uevent", "agent.guest", "agent.sandbox",
                 "agent.netlink", "agent.rpc.containers", "agent.rpc.resources", "agent.rpc.sandbox",
                 "agent.rpc.network", "agent.rpc.guest")


async def import_aside(names: tuple[str, ...] = BUILD_MODULES) -> None:
    """Import ``names`` in a short-lived thread while the event loop keeps serving; raises what
    an import raised. (Not the loop's executor: concurrent.futures' threads cost 0.06 s more of
    a TCG guest's boot, and would stay.)"""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finish(exc: BaseException | None) -> None:
        if not done.done():
            done.set_result(None) if exc is None else done.set_exception(exc)

    def work() -> None:
        exc: BaseException | None = None
        try:
            for name in names:
                importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            exc = e
        try:
            loop.call_soon_threadsafe(finish, exc)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    thread = threading.Thread(target=work, name="agent-imports", daemon=True)
    thread.start()
    await done  # cancelled (the agent stops while importing): the daemon thread ends by itself
    thread.join()  # it has handed over its result: this returns at once


async def build(agent: Agent) -> tuple[UndoStack, dict[str, Handler]]:
    """Every other component onto ``agent``, in order (in the running event loop: the uevent
    listener joins it), the stack that tears them down in reverse, and the RPC handlers. On a
    failure, what was built is torn down again and StartError says why."""
    config, spawner = agent.config, agent.spawner
    teardown = UndoStack()
    try:
        await import_aside()
        from agent.metrics import Metrics

        agent.metrics = Metrics(counts=lambda: agent.runtime.counts() if agent.runtime else (0, 0),
                                uptime=lambda: time.monotonic() - agent.started_at)
        from agent.runtime.container import Runtime

        agent.runtime = runtime = Runtime(spawner, config.run_dir, pipe_size=config.container_pipe_size)
        teardown.push("runtime", lambda: _remove_containers(runtime))
        agent.uevents = uevents = uevent_listener()
        if uevents is not None:
            teardown.push("uevents", uevents.stop)
        from agent.sandbox import Sandbox

        agent.sandbox = Sandbox(config.run_dir, config.hotplug_timeout, spawner, uevents)
        teardown.push("sandbox", agent.sandbox.shutdown)
        from agent.netlink import Netlink

        agent.network = Netlink()
        teardown.push("netlink", agent.network.close)
        handlers = all_handlers()
    except Exception as exc:
        await teardown.rollback()
        raise StartError(f"{type(exc).__name__}: {exc}") from exc
    return teardown, handlers


async def _remove_containers(runtime: Runtime) -> None:
    await runtime.remove_all()
    runtime.close()


async def run(config: Config, spawner: Spawner, boot: BootPolicy | None = None) -> int:
    """Build the agent, serve until asked to stop, tear down; returns the exit status. ``boot``:
    the boot policy as PID 1's set-up left it (parsed if the debug console asked)."""
    loop = asyncio.get_running_loop()
    REAPER.install(loop)
    spawner.supervise()
    agent = Agent(config=config, spawner=spawner)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    teardown = UndoStack()
    front: Front | None = None
    rc = 0
    try:
        agent.policy = boot_policy(boot or BootPolicy(config.policy_file))  # a bad one: the agent never listens
        services = Services(agent)  # AgentService calls wait for serve()
        front = Front(services, config.run_dir)
        bound = [await front.listen(addr) for addr in config.server_addrs]
        boottrace.mark("listening")
        teardown, handlers = await build(agent)
        services.serve(handlers)
        log.info("agent serving", extra={"fields": {"addrs": [str(a) for a in bound], "pid": os.getpid()}})

        await agent.stopping.wait()
        log.info("agent stopping")
    except (StartError, ListenError) as exc:
        log.error("agent cannot start", extra={"fields": {"error": str(exc)}})
        rc = 1
    finally:
        agent.stopping.set()
        if front is not None:
            await front.close()
        await teardown.rollback()
    log.info("agent stopped")
    return rc
