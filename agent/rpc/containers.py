"""Container lifecycle and stdio RPCs: check, delegate to agent.runtime, answer."""

from __future__ import annotations

import logging

from google.protobuf import empty_pb2

from agent.context import Agent
from agent.errors import FailedPrecondition, InvalidArgument
from agent.protocols import agent_pb2
from agent.rpc import rpc
from agent.validate import check_id

log = logging.getLogger(__name__)
EMPTY = empty_pb2.Empty


def _exec_id(request) -> str:
    return check_id(request.exec_id, "exec_id", allow_empty=True)


@rpc("CreateContainer")
async def create_container(agent: Agent, request: agent_pb2.CreateContainerRequest):
    from agent import create_container as recipe  # with agent.oci: 0.05 s of a TCG guest's boot, on first use

    container = await recipe.create_container(request, agent.runtime, agent.sandbox, agent.uevents,
                                              agent.config.hotplug_timeout)
    log.info("container created", extra={"fields": {"container_id": container.id, "pid": container.init_pid}})
    return EMPTY()


@rpc("StartContainer")
async def start_container(agent, request):
    await agent.runtime.start(check_id(request.container_id))
    return EMPTY()


@rpc("ExecProcess")
async def exec_process(agent, request):
    from agent import oci  # 0.05 s of a TCG guest's boot: on first use

    cid = check_id(request.container_id)
    exec_id = check_id(request.exec_id, "exec_id")
    agent.runtime.get(cid)
    if not request.HasField("process"):
        raise InvalidArgument("process: missing")
    proc = oci.convert_process(request.process, oci.string_user(request.string_user), "process")
    await agent.runtime.exec(cid, exec_id, proc)
    return EMPTY()


@rpc("WaitProcess")
async def wait_process(agent, request):
    status = await agent.runtime.wait(check_id(request.container_id), _exec_id(request))
    return agent_pb2.WaitProcessResponse(status=status)


@rpc("SignalProcess")
async def signal_process(agent, request):
    from agent import oci  # 0.05 s of a TCG guest's boot: on first use

    cid = check_id(request.container_id)
    if request.signal not in oci.SIGNALS and request.signal != 0:
        raise InvalidArgument(f"signal: {request.signal} is not a signal number")
    agent.runtime.signal(cid, _exec_id(request), request.signal)
    return EMPTY()


@rpc("RemoveContainer")
async def remove_container(agent, request):
    await agent.runtime.remove(check_id(request.container_id), timeout=request.timeout)
    return EMPTY()


def _stdio(agent, request):
    return agent.runtime.get(check_id(request.container_id)).process(_exec_id(request)).stdio


@rpc("ReadStdout")
async def read_stdout(agent, request):
    return agent_pb2.ReadStreamResponse(data=await _stdio(agent, request).read("stdout", request.len))


@rpc("ReadStderr")
async def read_stderr(agent, request):
    return agent_pb2.ReadStreamResponse(data=await _stdio(agent, request).read("stderr", request.len))


@rpc("WriteStdin")
async def write_stdin(agent, request):
    return agent_pb2.WriteStreamResponse(len=await _stdio(agent, request).write(request.data))


@rpc("CloseStdin")
async def close_stdin(agent, request):
    _stdio(agent, request).close_stdin()
    return EMPTY()


@rpc("TtyWinResize")
async def tty_win_resize(agent, request):
    stdio = _stdio(agent, request)
    if not stdio.terminal:
        raise FailedPrecondition("TtyWinResize: the process has no terminal")
    stdio.resize(request.row, request.column)
    return EMPTY()
