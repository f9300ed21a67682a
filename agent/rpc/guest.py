"""Guest management RPCs, GetMetrics and SetPolicy (domain in agent.guest, agent.metrics, agent.policy).

The setup hook installs the agent's policy (from --policy-file / agent.policy=, else allow-all)
and its metrics registry; agent.service consults both around every RPC.
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import empty_pb2

from agent import guest, policy
from agent.context import Agent
from agent.errors import InvalidArgument, NotFound
from agent.metrics import Metrics
from agent.protocols import agent_pb2
from agent.rpc import rpc

log = logging.getLogger(__name__)

EXTRA_FEATURES = ["policy-json", "metrics-prometheus", "iptables"]


class BootPolicyError(RuntimeError):
    """The boot policy could not be loaded: the agent refuses to serve rather than allow everything."""


def boot_policy(agent: Agent) -> policy.PolicyHolder:
    value = agent.config.policy_file
    if not value:
        return policy.PolicyHolder()
    try:
        text, source = policy.load_source(value)
        holder = policy.PolicyHolder(policy.parse(text, source))
    except (OSError, policy.PolicyError) as exc:
        message = exc.message if isinstance(exc, policy.PolicyError) else f"{value}: {exc.strerror}"
        raise BootPolicyError(f"policy at boot: {message}") from None
    log.info("policy loaded", extra={"fields": {"source": source, "rules": len(holder.current.rules)}})
    return holder


def _counts(agent: Agent) -> tuple[int, int]:
    runtime = agent.runtime
    if runtime is None or not hasattr(runtime, "ids"):
        return 0, 0
    ids = runtime.ids()
    processes = 0
    for cid in ids:
        try:
            c = runtime.get(cid)
            processes += sum(1 for p in (c.init, *c.processes.values()) if p.running)
        except Exception:  # noqa: BLE001 - a container going away while we count
            continue
    return len(ids), processes


async def setup(agent: Agent) -> None:
    agent.policy = boot_policy(agent)
    agent.metrics = Metrics(counts=lambda: _counts(agent),
                            uptime=lambda: time.monotonic() - agent.started_at)


@rpc("SetPolicy")
async def set_policy(agent: Agent, request: agent_pb2.SetPolicyRequest):
    agent.policy.replace(request.policy)
    return empty_pb2.Empty()


@rpc("GetMetrics")
async def get_metrics(agent: Agent, request):
    return agent_pb2.Metrics(metrics=agent.metrics.text())


@rpc("GetGuestDetails")
async def get_guest_details(agent: Agent, request: agent_pb2.GuestDetailsRequest):
    return guest.guest_details(request, EXTRA_FEATURES)


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
    guest.check_seed(request.data)
    await asyncio.to_thread(guest.reseed, request.data)
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
        runtime = agent.runtime
        if runtime is None or request.container_id not in runtime.ids():
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
