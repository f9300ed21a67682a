"""The agent's components, shared by every RPC handler.

agent.wiring builds each of them, in order, and tears them down in reverse; the RPC areas
(agent.rpc) only use them. Unit tests build an Agent with the few components they need; the
others stay None.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.config import Config

if TYPE_CHECKING:  # annotations only: importing them here would make every area import all
    from agent.metrics import Metrics
    from agent.netlink import Netlink
    from agent.policy import PolicyHolder
    from agent.runtime.container import Runtime
    from agent.runtime.spawner import Spawner
    from agent.sandbox import Sandbox
    from agent.uevent import UeventListener


@dataclass
class Agent:
    config: Config
    # Prometheus registry and RPC instruments (agent.metrics).
    metrics: Metrics | None = None
    # Allow/deny decisions before every RPC (agent.policy); None allows everything.
    policy: PolicyHolder | None = None
    # The single-threaded process that forks containers (agent.runtime.spawner).
    spawner: Spawner | None = None
    # Containers and their processes (agent.runtime.container).
    runtime: Runtime | None = None
    # NETLINK_KOBJECT_UEVENT listener; None where the agent may not open one (unprivileged).
    uevents: UeventListener | None = None
    # The sandbox: hostname, pinned namespaces, DNS, storages (agent.sandbox).
    sandbox: Sandbox | None = None
    # The netlink worker for interfaces, routes and neighbours (agent.netlink; the domain: agent.network).
    network: Netlink | None = None
    started_at: float = field(default_factory=time.monotonic)
    # Set when the agent should stop serving (signal, or a request to shut down).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
