"""The spawner protocol: the requests the agent sends the spawner, and the named steps the agent
and a request's child take on that request's own ``sync`` socket (runc's procReady, procRun...).

A request is one SOCK_SEQPACKET message on the spawner's socket (JSON, with fds by SCM_RIGHTS,
the first fd being the child's end of the sync socketpair). On the sync socket, each message is
one step, in this order:

    CreateRequest   child -> Pid      the container init's pid, as the agent sees it
                    agent -> Cgroup   the cgroup the agent made meanwhile (EOF: it gave up)
      (a new user namespace only:)
                    child -> UserNs   it unshared the user namespace (its pid, as the agent sees it)
                    agent -> Mapped   the agent wrote that process's uid_map and gid_map
                    child -> Ready    the init waits in its namespaces and rootfs
                    agent -> Start    exec the container's process
                    child -> EOF      exec succeeded (the sync fd is close-on-exec)
    ExecRequest     child -> Pid, then EOF when the process exec'd
    TaskRequest     child -> Pid (the worker's), then Reply

Failed(error) may replace any step a child sends: it names what went wrong, and the child exits.

Steps are told apart by type (isinstance), never by ``==``: NamedTuples compare as tuples, so
``Ready() == Start()``. Messages are NamedTuples, not dataclasses: this module is imported by the spawner, whose every
fork copies what it loaded (tests/unit/test_linux.py::test_the_spawner_side_stays_small). The
container config and process inside a request are agent.oci's dataclasses on the agent's side
and travel as their JSON objects.
"""

from __future__ import annotations

import json
import socket
from typing import Any, NamedTuple

MAX_MESSAGE = 1 << 18


# --- requests (agent -> spawner) ----------------------------------------------------------------

class Cgroup(NamedTuple):
    """The directories a new process of a container's cgroup joins."""
    v2: str = ""  # the cgroup v2 directory, or ""
    v1: list[str] = []  # one per v1 hierarchy (a default never mutated)


class CreateRequest(NamedTuple):
    config: Any  # agent.oci.ContainerConfig; its JSON object in the child
    cgroup: Cgroup | None = None  # None: sent as a Cgroup step once the agent has made it


class ExecRequest(NamedTuple):
    init_pid: int
    process: Any  # agent.oci.ProcessConfig; its JSON object in the child
    cgroup: Cgroup
    seccomp: Any = None  # agent.oci.SeccompConfig; its JSON object in the child


class TaskRequest(NamedTuple):
    name: str  # in agent.sandbox_tasks.TASKS
    args: dict[str, Any]


Request = CreateRequest | ExecRequest | TaskRequest
_OPS: dict[type, str] = {CreateRequest: "create", ExecRequest: "exec", TaskRequest: "task"}


def encode_request(req: Request) -> bytes:
    return json.dumps({"op": _OPS[type(req)], **req._asdict()}, default=_fields).encode()


def decode_request(data: bytes) -> Request:
    obj = json.loads(data)
    op = obj.pop("op")
    if op == "create":
        cgroup = obj["cgroup"]
        return CreateRequest(obj["config"], Cgroup(*cgroup) if cgroup is not None else None)
    if op == "exec":
        return ExecRequest(obj["init_pid"], obj["process"], Cgroup(*obj["cgroup"]), obj["seccomp"])
    if op == "task":
        return TaskRequest(obj["name"], obj["args"])
    raise ValueError(f"unknown spawner request {op!r}")


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass in a request, as JSON: its fields (json recurses; ``dataclasses.asdict``
    would deep-copy everything first, at several times the cost). Only the agent sends these."""
    import dataclasses

    if not dataclasses.is_dataclass(obj):
        raise TypeError(f"{type(obj).__name__} in a spawner request")
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# --- steps on a sync socket ---------------------------------------------------------------------

class Pid(NamedTuple):
    pid: int


class Ready(NamedTuple):
    pass


class Start(NamedTuple):
    pass


class UserNs(NamedTuple):
    pid: int


class Mapped(NamedTuple):
    pass


class Failed(NamedTuple):
    error: str


class Reply(NamedTuple):
    data: dict[str, Any]


Step = Pid | Cgroup | UserNs | Mapped | Ready | Start | Failed | Reply
_STEPS: dict[str, type] = {"pid": Pid, "cgroup": Cgroup, "userns": UserNs, "mapped": Mapped, "ready": Ready,
                           "start": Start, "failed": Failed, "reply": Reply}
_NAMES = {cls: name for name, cls in _STEPS.items()}


def encode(step: Step) -> bytes:
    return json.dumps([_NAMES[type(step)], *step]).encode()


def decode(data: bytes) -> Step:
    name, *fields = json.loads(data)
    return _STEPS[name](*fields)


def send(sync: socket.socket, step: Step) -> None:
    """Send one step; a peer that went away is not an error here (its end tells the story)."""
    try:
        sync.send(encode(step))
    except OSError:
        pass


def receive(sync: socket.socket) -> Step | None:
    """The next step on a blocking sync socket, or None at EOF (the child's side)."""
    data = sync.recv(MAX_MESSAGE)
    return decode(data) if data else None
