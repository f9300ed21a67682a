"""The agent's state, shared by every RPC handler.

Each area keeps its own state object here. Areas set their attribute in their ``setup(agent)``
hook (see agent.rpc) and release it in ``teardown(agent)``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from agent.config import Config


@dataclass
class Agent:
    config: Config
    started_at: float = field(default_factory=time.monotonic)
    # The single-threaded process that forks containers; created before grpc is imported.
    spawner: Any = None
    # Containers and their processes (agent.runtime).
    runtime: Any = None
    # The sandbox: hostname, pinned namespaces, DNS, storages (agent.sandbox).
    sandbox: Any = None
    # NETLINK_KOBJECT_UEVENT listener (agent.devices).
    uevents: Any = None
    # The netlink worker for interfaces, routes and neighbours (agent.network.Netlink).
    network: Any = None
    # Allow/deny decisions before every RPC (agent.policy); None allows everything.
    policy: Any = None
    # Prometheus registry and RPC instruments (agent.metrics).
    metrics: Any = None
    # Set when the agent should stop serving (signal, or a request to shut down).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
