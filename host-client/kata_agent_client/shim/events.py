"""Task events to containerd: ``Events.Forward`` on the ttrpc address containerd passes in
TTRPC_ADDRESS, one envelope per event, in the order they happened."""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import timestamp_pb2

from agent import ttrpc
from kata_agent_client.shim.protocols import ctd_events_service_pb2 as evsvc

log = logging.getLogger(__name__)

SERVICE = "containerd.services.events.ttrpc.v1.Events"
TOPICS = {
    "TaskCreate": "/tasks/create", "TaskStart": "/tasks/start", "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete", "TaskExecAdded": "/tasks/exec-added",
    "TaskExecStarted": "/tasks/exec-started", "TaskOOM": "/tasks/oom", "TaskPaused": "/tasks/paused",
    "TaskResumed": "/tasks/resumed", "TaskCheckpointed": "/tasks/checkpointed",
}


def now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def envelope(namespace: str, event) -> evsvc.Envelope:
    name = event.DESCRIPTOR.name
    env = evsvc.Envelope(timestamp=now(), namespace=namespace, topic=TOPICS[name])
    # containerd resolves the type by the message's full name (typeurl), not a googleapis URL
    env.event.type_url = event.DESCRIPTOR.full_name
    env.event.value = event.SerializeToString()
    return env


class Publisher:
    """Queues events and forwards them one by one on one connection (made again when lost)."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self.queue: asyncio.Queue = asyncio.Queue()
        self.client: ttrpc.AsyncClient | None = None
        self.task: asyncio.Task | None = None

    def publish(self, event) -> None:
        if not self.address:
            return
        self.queue.put_nowait(envelope(self.namespace, event))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            env = await self.queue.get()
            try:
                await self._forward(env)
            finally:
                self.queue.task_done()

    async def _forward(self, env, attempts: int = 3) -> None:
        body = evsvc.ForwardRequest(envelope=env).SerializeToString()
        for attempt in range(attempts):
            try:
                if self.client is None or self.client.closed:
                    self.client = await ttrpc.AsyncClient.connect_unix(self.address)
                await self.client.call(SERVICE, "Forward", body, timeout=10)
                return
            except (OSError, ttrpc.Status) as exc:
                log.warning("publishing %s (attempt %d): %s", env.topic, attempt + 1, exc)
                if self.client is not None:
                    self.client.close()
                    self.client = None
                await asyncio.sleep(0.1 * (attempt + 1))

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued event went out (or could not)."""
        try:
            async with asyncio.timeout(timeout):
                await self.queue.join()
        except TimeoutError:
            log.warning("events still queued at exit: %d", self.queue.qsize())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.client is not None:
            self.client.close()
