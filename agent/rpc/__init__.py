"""RPC handlers, one module per area; each marks its methods with ``@rpc("Name")``.

A handler is ``async def handler(agent: Agent, request) -> reply``. It validates, calls
the domain and returns the reply; it raises ``agent.errors.AgentError`` subclasses for failures.
``agent.service`` wraps every handler with policy, metrics, logging and error mapping, and answers
UNIMPLEMENTED for any AgentService method no handler serves. agent.wiring lists the area modules.
The areas build nothing: every component they use is on the Agent (agent.context).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

Handler = Callable[..., Awaitable[Any]]


def rpc(method: str) -> Callable[[Handler], Handler]:
    """Mark ``fn`` as the handler of AgentService method ``method``."""
    def mark(fn: Handler) -> Handler:
        fn.rpc_method = method  # type: ignore[attr-defined]
        return fn

    return mark


def handlers(*modules: ModuleType) -> dict[str, Handler]:
    """The handlers the given area modules mark, by method name."""
    table: dict[str, Handler] = {}
    for module in modules:
        for fn in vars(module).values():
            method = getattr(fn, "rpc_method", None)
            if method is None or getattr(fn, "__module__", None) != module.__name__:
                continue
            if method in table:
                raise RuntimeError(f"{method} has two handlers")
            table[method] = fn
    return table
