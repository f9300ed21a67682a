"""GetMetrics: Prometheus text exposition of the agent's own metrics and the guest's.

The agent's RPC counts and latencies, by method and code, are kept here in plain dicts (fed by
agent.service through ``observe_rpc``), so an idle agent does not load prometheus-client (2 MB of
RSS; 0.35 s of a TCG guest's boot). The first scrape imports agent.exposition (in a thread, so the
event loop serves other calls meanwhile: ``scrape``), which renders them
in the agent's own CollectorRegistry (never prometheus-client's global one) beside the agent process
(RSS, CPU, fds, threads), its containers and processes, and the guest's figures (load, memory, CPU
time, disk and network counters) read from /proc at each scrape.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from typing import Any

AGENT = "kata_agent"
GUEST = "kata_guest"
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The RPC instruments; ``scrape()`` is the GetMetrics reply. Used from the event loop only
    (but for the first scrape's import and registry, made in a thread)."""

    def __init__(self, counts: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 uptime: Callable[[], float] = lambda: 0.0, proc: str = "/proc") -> None:
        self.counts = counts
        self.uptime = uptime
        self.proc = proc
        # (method, code) -> calls; method -> [calls per bucket of RPC_BUCKETS, then +Inf; seconds]
        self.requests: dict[tuple[str, str], int] = {}
        self.durations: dict[str, tuple[list[int], list[float]]] = {}
        self._registry = None
        self._loading: asyncio.Future | None = None  # the first scrape's import, in a thread

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        entry = self.durations.get(method)
        if entry is None:
            entry = self.durations[method] = ([0] * (len(RPC_BUCKETS) + 1), [0.0])
        entry[0][bisect.bisect_left(RPC_BUCKETS, seconds)] += 1
        entry[1][0] += seconds

    async def scrape(self) -> str:
        """The GetMetrics reply, from the event loop. The first one imports prometheus-client
        and builds the registry in a thread (concurrent first scrapes share it), so other calls
        are served meanwhile; rendering (about 1 ms) stays on the loop, where the counts change."""
        if self._registry is None:
            if self._loading is None:
                self._loading = asyncio.ensure_future(asyncio.to_thread(self._build))
            loading = self._loading
            try:
                registry = await asyncio.shield(loading)
            except Exception:
                if self._loading is loading and loading.done():
                    self._loading = None  # the next scrape tries again
                raise
            if self._registry is None:
                self._registry = registry
        return self.text()

    def _build(self) -> Any:
        from agent import exposition

        return exposition.registry(self)

    def text(self) -> str:
        """The exposition text, imported and built on the caller's thread if not done yet."""
        from agent import exposition

        if self._registry is None:
            self._registry = self._build()
        return exposition.render(self._registry)
