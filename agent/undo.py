"""An undo stack: every step that changes the machine registers how to take itself back.

Fault points for tests: ``KATA_AGENT_FAULT_INJECT=step,step`` makes the named steps fail right
after they succeeded (CreateSandbox: pin_namespaces sandbox_pidns dns kernel_modules
sandbox_storages guest_hooks; CreateContainer: devices storages namespaces bundle), so a test can
see that the stack takes back everything they did.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from agent.errors import Internal

log = logging.getLogger(__name__)

FAULT_ENV = "KATA_AGENT_FAULT_INJECT"

Undo = Callable[[], Any] | Callable[[], Awaitable[Any]]


class UndoStack:
    """Collects undo actions; ``rollback`` runs them newest first, ``commit`` hands them over.

    Use as ``async with UndoStack() as undo:``; leaving the block by an exception rolls back.
    Undo actions must be idempotent enough to run after a partial step; a failing undo is logged
    and the rest still run.
    """

    def __init__(self) -> None:
        self._actions: list[tuple[str, Undo]] = []

    def push(self, what: str, action: Undo) -> None:
        self._actions.append((what, action))

    def commit(self) -> "UndoStack":
        """Forget the registered actions and hand them over as a new stack, for the caller to
        roll back later (e.g. at removal); this stack is empty afterwards."""
        kept = UndoStack()
        kept._actions, self._actions = self._actions, []
        return kept

    async def rollback(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                result = action()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - keep undoing the rest
                log.exception("undo failed", extra={"fields": {"step": what}})

    async def __aenter__(self) -> "UndoStack":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            await self.rollback()


def fault_point(step: str) -> None:
    """Fail here when a test asked for it (``KATA_AGENT_FAULT_INJECT``)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted and step in wanted.split(","):
        raise Internal(f"fault injected after step {step}")
