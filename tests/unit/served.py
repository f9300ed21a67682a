"""An in-process agent front (agent.server.Front) on a loopback port, for unit tests.

    with served({"StartContainer": handler}) as s:
        s.addr      # "tcp://127.0.0.1:PORT": ttrpc and gRPC both
        s.agent     # the Agent the handlers get

The front's event loop runs in a thread of its own, so tests call it with blocking clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
from dataclasses import dataclass

from agent.config import Address, Config
from agent.context import Agent
from agent.server import Front
from agent.service import Services


@dataclass
class Served:
    addr: str
    agent: Agent
    front: Front
    loop: asyncio.AbstractEventLoop

    def run(self, coro, timeout: float = 10):
        """Run ``coro`` on the front's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def served(handlers: dict, *, policy=None, addr: str = "tcp://127.0.0.1:0"):
    run_dir = tempfile.mkdtemp(prefix="served-")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        agent = Agent(config=Config(), policy=policy)
        front = Front(Services(agent, handlers), run_dir)
        host, _, port = addr.removeprefix("tcp://").rpartition(":")
        bound = await front.listen(Address("tcp", host=host, port=int(port)))
        return Served(str(bound), agent, front, loop)

    s = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield s
    finally:
        s.run(s.front.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        shutil.rmtree(run_dir, ignore_errors=True)
