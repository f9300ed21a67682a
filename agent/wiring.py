"""How the agent is put together: ``run`` builds every component, in order, serves, and tears
them down in reverse.

    config -> metrics -> policy -> spawner -> runtime -> uevent listener -> sandbox -> netlink
           -> services and listeners (agent.service, agent.server)

agent.__main__ reads the config and starts the spawner (before anything can start a thread);
everything else is built here. The RPC areas (agent.rpc.*) build nothing: they use what is on
the Agent (agent.context).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from agent.bootpolicy import BootPolicy
from agent.config import Config
from agent.context import Agent
from agent.errors import AgentError
from agent.metrics import Metrics
from agent.netlink import Netlink
from agent.rpc import Handler, containers, guest, handlers, network, resources
from agent.rpc import sandbox as sandbox_rpc
from agent.runtime.container import Runtime
from agent.runtime.reaper import REAPER
from agent.runtime.spawner import Spawner
from agent.sandbox import Sandbox
from agent.server import Front, ListenError
from agent.service import Services
from agent.uevent import UeventListener
from agent.undo import UndoStack

if TYPE_CHECKING:
    from agent.policy import PolicyHolder

log = logging.getLogger(__name__)


class StartError(Exception):
    """A component could not be built (e.g. an invalid boot policy); the agent does not serve."""


def all_handlers() -> dict[str, Handler]:
    """Every RPC handler, by AgentService method name."""
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
    listener = UeventListener()
    try:
        listener.start()
    except OSError as exc:  # no netlink (unprivileged): device waits poll sysfs instead
        log.warning("no uevent listener: %s", exc)
        return None
    return listener


async def build(config: Config, spawner: Spawner,
                boot: BootPolicy | None = None) -> tuple[Agent, UndoStack]:
    """Every component, in order (in the running event loop: the uevent listener joins it), and
    the stack that tears them down in reverse. On a failure, what was built is torn down again
    and StartError says why."""
    agent = Agent(config=config, spawner=spawner)
    teardown = UndoStack()
    try:
        agent.metrics = Metrics(counts=lambda: agent.runtime.counts() if agent.runtime else (0, 0),
                                uptime=lambda: time.monotonic() - agent.started_at)
        agent.policy = boot_policy(boot or BootPolicy(config.policy_file))
        agent.runtime = runtime = Runtime(spawner, config.run_dir, pipe_size=config.container_pipe_size)
        teardown.push("runtime", lambda: _remove_containers(runtime))
        agent.uevents = uevents = uevent_listener()
        if uevents is not None:
            teardown.push("uevents", uevents.stop)
        agent.sandbox = Sandbox(config.run_dir, config.hotplug_timeout, spawner, uevents)
        teardown.push("sandbox", agent.sandbox.shutdown)
        agent.network = Netlink()
        teardown.push("netlink", agent.network.close)
    except Exception as exc:
        await teardown.rollback()
        if isinstance(exc, StartError):
            raise
        raise StartError(f"{type(exc).__name__}: {exc}") from exc
    return agent, teardown


async def _remove_containers(runtime: Runtime) -> None:
    await runtime.remove_all()
    runtime.close()


async def run(config: Config, spawner: Spawner, boot: BootPolicy | None = None) -> int:
    """Build the agent, serve until asked to stop, tear down; returns the exit status. ``boot``:
    the boot policy as PID 1's set-up left it (parsed if the debug console asked)."""
    loop = asyncio.get_running_loop()
    REAPER.install(loop)
    spawner.supervise()
    agent: Agent | None = None
    teardown = UndoStack()
    front: Front | None = None
    rc = 0
    try:
        agent, teardown = await build(config, spawner, boot)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stopping.set)
        front = Front(Services(agent, all_handlers()), config.run_dir)
        bound = [await front.listen(addr) for addr in config.server_addrs]
        log.info("agent serving", extra={"fields": {"addrs": [str(a) for a in bound], "pid": os.getpid()}})

        await agent.stopping.wait()
        log.info("agent stopping")
    except (StartError, ListenError) as exc:
        log.error("agent cannot start", extra={"fields": {"error": str(exc)}})
        rc = 1
    finally:
        if agent is not None:
            agent.stopping.set()
        if front is not None:
            await front.close()
        await teardown.rollback()
    log.info("agent stopped")
    return rc
