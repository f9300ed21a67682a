"""RPC handlers, one module per area; each registers its methods with ``@rpc("Name")``.

A handler is ``async def handler(agent: Agent, request) -> reply``. It validates, calls
the domain and returns the reply; it raises ``agent.errors.AgentError`` subclasses for failures.
``agent.service`` wraps every handler with policy, metrics, logging and error mapping, and answers
UNIMPLEMENTED for any AgentService method that no module registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[..., Awaitable[Any]]

HANDLERS: dict[str, Handler] = {}
# Per-area start-up and shut-down hooks: ``async def setup(agent)`` / ``async def teardown(agent)``
# defined at module level in an area module. Setups run in MODULES order, teardowns in reverse.
SETUPS: list[Callable[..., Awaitable[None]]] = []
TEARDOWNS: list[Callable[..., Awaitable[None]]] = []

# Areas, in no particular order. A module that fails to import is a bug, not a skipped feature.
MODULES = ("containers", "resources", "sandbox", "network", "guest")


def rpc(method: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        if method in HANDLERS:
            raise RuntimeError(f"{method} registered twice")
        HANDLERS[method] = fn
        return fn

    return register


def load_all() -> dict[str, Handler]:
    for name in MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        for hook, into in (("setup", SETUPS), ("teardown", TEARDOWNS)):
            fn = getattr(module, hook, None)
            if fn is not None and fn not in into:
                into.append(fn)
    return HANDLERS
