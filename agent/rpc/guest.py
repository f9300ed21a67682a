"""Guest management RPCs, GetMetrics and SetPolicy (domain in agent.guest, agent.metrics, agent.policy)."""

from __future__ import annotations

import asyncio
import logging

from google.protobuf import empty_pb2

from agent import guest
from agent.context import Agent
from agent.errors import InvalidArgument, NotFound
from agent.protocols import agent_pb2
from agent.rpc import rpc

log = logging.getLogger(__name__)

EXTRA_FEATURES = ["policy-json", "metrics-prometheus", "iptables"]


@rpc("SetPolicy")
async def set_policy(agent: Agent, request: agent_pb2.SetPolicyRequest):
    if agent.policy is None:  # allow-all since boot: the first policy
        from agent import policy

        holder = policy.PolicyHolder()
        holder.replace(request.policy)  # raises before anything changes
        agent.policy = holder
    else:
        agent.policy.replace(request.policy)
    return empty_pb2.Empty()


@rpc("GetMetrics")
async def get_metrics(agent: Agent, request):
    return agent_pb2.Metrics(metrics=await agent.metrics.scrape())


@rpc("GetGuestDetails")
async def get_guest_details(agent: Agent, request: agent_pb2.GuestDetailsRequest):
    from agent import rego

    rego_ok = ["policy-rego"] if rego.engine_error() is None else []
    return guest.guest_details(request, EXTRA_FEATURES + rego_ok)


@rpc("OnlineCPUMem")
async def online_cpu_mem(agent: Agent, request: agent_pb2.OnlineCPUMemRequest):
    if request.wait:
        await guest.online_cpu_mem(request)
    else:  # the host does not wait: online in the background and log the outcome
        task = asyncio.create_task(guest.online_cpu_mem(request))
        _background.add(task)
        task.add_done_callback(_log_background)
    return empty_pb2.Empty()


_background: set[asyncio.Task] = set()


def _log_background(task: asyncio.Task) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("OnlineCPUMem in the background failed: %s", task.exception())


@rpc("MemHotplugByProbe")
async def mem_hotplug_by_probe(agent: Agent, request: agent_pb2.MemHotplugByProbeRequest):
    await guest.mem_hotplug_by_probe(list(request.memHotplugProbeAddr))
    return empty_pb2.Empty()


@rpc("SetGuestDateTime")
async def set_guest_date_time(agent: Agent, request: agent_pb2.SetGuestDateTimeRequest):
    guest.set_datetime(request.Sec, request.Usec)
    return empty_pb2.Empty()


@rpc("ReseedRandomDev")
async def reseed_random_dev(agent: Agent, request: agent_pb2.ReseedRandomDevRequest):
    # inline (it checks the seed first): two ioctls and a small file, and the first RPC after a
    # template's restore, where the loop's first thread (and concurrent.futures, not imported at
    # start) cost 0.1 s under TCG
    guest.reseed(request.data)
    return empty_pb2.Empty()


@rpc("AddSwap")
async def add_swap(agent: Agent, request: agent_pb2.AddSwapRequest):
    await guest.add_swap(list(request.PCIPath), agent.uevents, agent.config.hotplug_timeout)
    return empty_pb2.Empty()


@rpc("AddSwapPath")
async def add_swap_path(agent: Agent, request: agent_pb2.AddSwapPathRequest):
    await guest.add_swap_path(request.path)
    return empty_pb2.Empty()


@rpc("GetVolumeStats")
async def get_volume_stats(agent: Agent, request: agent_pb2.VolumeStatsRequest):
    return await asyncio.to_thread(guest.volume_stats, request.volume_guest_path)


@rpc("ResizeVolume")
async def resize_volume(agent: Agent, request: agent_pb2.ResizeVolumeRequest):
    await guest.resize_volume(request.volume_guest_path)
    return empty_pb2.Empty()


@rpc("GetDiagnosticData")
async def get_diagnostic_data(agent: Agent, request: agent_pb2.GetDiagnosticDataRequest):
    if request.container_id:
        if request.container_id not in agent.runtime.ids():
            raise NotFound(f"container_id: no container {request.container_id!r}")
    if not request.log_type:
        raise InvalidArgument(f"log_type: required; one of {', '.join(sorted(guest.DIAGNOSTICS))}")
    return agent_pb2.GetDiagnosticDataResponse(data=await guest.diagnostic_data(request.log_type))


@rpc("MemAgentMemcgSet")
async def mem_agent_memcg_set(agent: Agent, request):
    raise guest.memory_agent_unavailable("MemAgentMemcgSet")


@rpc("MemAgentCompactSet")
async def mem_agent_compact_set(agent: Agent, request):
    raise guest.memory_agent_unavailable("MemAgentCompactSet")
