"""Resource RPCs: UpdateContainer, StatsContainer, PauseContainer, ResumeContainer, GetOOMEvent.

Each checks the request, finds the container in agent.runtime and delegates to its cgroup
(agent.runtime.cgroups).
"""

from __future__ import annotations

import logging

from google.protobuf import empty_pb2

from agent.errors import FailedPrecondition
from agent.protocols import agent_pb2
from agent.rpc import rpc
from agent.validate import check_id

log = logging.getLogger(__name__)
EMPTY = empty_pb2.Empty


def _container(agent, request):
    return agent.runtime.get(check_id(request.container_id))


def _cgroup(container):
    if container.cgroup is None:
        raise FailedPrecondition(f"container {container.id} has no cgroup")
    return container.cgroup


def _running(container) -> bool:
    init = getattr(container, "init", None)
    return init is None or init.running


@rpc("UpdateContainer")
async def update_container(agent, request):
    container = _container(agent, request)
    if request.HasField("resources"):
        _cgroup(container).update(request.resources)
        log.info("resources updated", extra={"fields": {"container_id": container.id}})
    return EMPTY()


@rpc("StatsContainer")
async def stats_container(agent, request):
    container = _container(agent, request)
    reply = agent_pb2.StatsContainerResponse(cgroup_stats=_cgroup(container).stats())
    if _running(container):
        reply.network_stats.extend(network_stats(container.init_pid))
    return reply


@rpc("PauseContainer")
async def pause_container(agent, request):
    container = _container(agent, request)
    if container.paused:
        raise FailedPrecondition(f"container {container.id} is already paused")
    if not _running(container):
        raise FailedPrecondition(f"container {container.id} is not running")
    await _cgroup(container).freeze()
    container.paused = True
    log.info("container paused", extra={"fields": {"container_id": container.id}})
    return EMPTY()


@rpc("ResumeContainer")
async def resume_container(agent, request):
    container = _container(agent, request)
    if not container.paused:
        raise FailedPrecondition(f"container {container.id} is not paused")
    _cgroup(container).thaw()
    container.paused = False
    log.info("container resumed", extra={"fields": {"container_id": container.id}})
    return EMPTY()


@rpc("GetOOMEvent")
async def get_oom_event(agent, request):
    owner = await agent.runtime.cgroups.next_oom_event()
    return agent_pb2.OOMEvent(container_id=owner)


# ---- network statistics from the container's network namespace ----


def parse_net_dev(text: str) -> list[agent_pb2.NetworkStats]:
    """/proc/<pid>/net/dev -> NetworkStats for every interface but lo."""
    out = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        values = rest.split()
        if not sep or len(values) < 16 or name.strip() == "lo":
            continue
        n = [int(v) for v in values]
        out.append(agent_pb2.NetworkStats(
            name=name.strip(), rx_bytes=n[0], rx_packets=n[1], rx_errors=n[2], rx_dropped=n[3],
            tx_bytes=n[8], tx_packets=n[9], tx_errors=n[10], tx_dropped=n[11]))
    return out


def network_stats(pid: int) -> list[agent_pb2.NetworkStats]:
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            return parse_net_dev(f.read())
    except (OSError, ValueError) as exc:
        log.debug("no network stats for pid %d: %s", pid, exc)
        return []
