"""Network RPCs: interfaces, routes, ARP neighbours and iptables (domain in agent.network).

agent.network is imported by the first network RPC, not at start (0.09 s of a TCG guest's boot);
the netlink worker the agent builds at start is agent.netlink's."""

from __future__ import annotations

from google.protobuf import empty_pb2

from agent.context import Agent
from agent.errors import InvalidArgument
from agent.protocols import agent_pb2
from agent.rpc import rpc


def _network():
    from agent import network

    return network


@rpc("UpdateInterface")
async def update_interface(agent: Agent, request: agent_pb2.UpdateInterfaceRequest):
    if not request.HasField("interface"):
        raise InvalidArgument("interface: required")
    # A PCI device the host just plugged may take a moment to appear; a MAC is looked up as is.
    timeout = agent.config.hotplug_timeout if request.interface.devicePath else 0.0
    return await _network().update_interface(agent.network, request.interface, timeout=timeout)


@rpc("UpdateRoutes")
async def update_routes(agent: Agent, request: agent_pb2.UpdateRoutesRequest):
    routes = await _network().update_routes(agent.network, list(request.routes.Routes))
    return agent_pb2.Routes(Routes=routes)


@rpc("ListInterfaces")
async def list_interfaces(agent: Agent, request):
    return agent_pb2.Interfaces(Interfaces=await _network().list_interfaces(agent.network))


@rpc("ListRoutes")
async def list_routes(agent: Agent, request):
    return agent_pb2.Routes(Routes=await _network().list_routes(agent.network))


@rpc("AddARPNeighbors")
async def add_arp_neighbors(agent: Agent, request: agent_pb2.AddARPNeighborsRequest):
    await _network().add_arp_neighbors(agent.network, list(request.neighbors.ARPNeighbors))
    return empty_pb2.Empty()


@rpc("GetIPTables")
async def get_iptables(agent: Agent, request: agent_pb2.GetIPTablesRequest):
    return agent_pb2.GetIPTablesResponse(data=await _network().get_iptables(request.is_ipv6))


@rpc("SetIPTables")
async def set_iptables(agent: Agent, request: agent_pb2.SetIPTablesRequest):
    return agent_pb2.SetIPTablesResponse(data=await _network().set_iptables(request.is_ipv6, request.data))
