"""The netlink worker the agent builds at start: one thread that owns pyroute2's rtnetlink socket.

Apart from agent.network, whose domain (dataclasses, ipaddress, the RPCs' conversions) is imported
by the first network RPC: 0.09 s of a TCG guest's boot. The thread (and concurrent.futures'
executor, 0.06 s more) comes with the first step, and pyroute2 is imported there (9 MB, 1-2 s in
a TCG guest).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from pyroute2 import IPRoute

T = TypeVar("T")


class Netlink:
    """One thread that owns an rtnetlink socket; ``run(fn, *args)`` calls ``fn(ipr, *args)`` there."""

    def __init__(self, factory: Callable[[], IPRoute] | None = None) -> None:
        self._factory = factory
        self._executor: ThreadPoolExecutor | None = None
        self._ipr: IPRoute | None = None

    def _call(self, fn: Callable[..., T], args: tuple, kwargs: dict[str, Any]) -> T:
        if self._ipr is None:
            if self._factory is None:
                from pyroute2 import IPRoute

                self._factory = IPRoute
            self._ipr = self._factory()
        return fn(self._ipr, *args, **kwargs)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, args, kwargs)

    def _close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def close(self) -> None:
        if self._executor is None:  # never used
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)
