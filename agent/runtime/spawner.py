"""The spawner: a single-threaded process of its own that forks every container.

``start_spawner()`` (called by agent.__main__) starts it as a fresh ``python -S`` with
posix_spawn, not as a fork of the agent, so it can be started again from the multi-threaded agent. The agent sends it one SOCK_SEQPACKET message per request (agent.runtime.protocol: a
CreateRequest, ExecRequest or TaskRequest, plus fds by SCM_RIGHTS, the first fd being the child's
end of a fresh per-request ``sync`` socketpair). The spawner forks an intermediate child that
does the work (agent.runtime.child) and takes the protocol's steps on ``sync``; the spawner
itself never answers, so the agent side needs no request ids.

CreateContainer requests whose container gets a new PID namespace take a shorter way, on a socket
of their own: a zygote born as PID 1 of a fresh PID namespace, and as the agent's child, takes
the request and becomes the container's init itself (no intermediate, no fork while the client
waits; see ``_serve``).

Other areas run code in a forked child with ``await agent.spawner.run_task(name, args, fds)``;
the functions are listed by name in agent.sandbox_tasks.TASKS.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from typing import Any

from agent import boottrace, linux, sandbox_tasks
from agent.runtime import protocol
from agent.runtime.protocol import MAX_MESSAGE, CreateRequest, ExecRequest, Failed, Pid, Reply, TaskRequest

MAX_FDS = 16


class SpawnError(Exception):
    """The spawner or its child failed; the message is the child's own report."""


# --- the spawner process ------------------------------------------------------------------------

def _serve(sock: socket.socket, init_sock: socket.socket) -> None:
    """Keep one forked "zygote" waiting on each of the agent's sockets, so no request waits for a fork.

    A zygote takes one request, tells the spawner (``taken``), and serves it; the spawner then
    forks the next zygote for that socket and reaps the old ones. The zygote on ``sock`` becomes
    the request's intermediate child. The one on ``init_sock`` (CreateContainer in a new PID
    namespace) is cloned as PID 1 of a new PID namespace and as the agent's child
    (``CLONE_PARENT``): it becomes the container's init, which the agent reaps.
    Where a new PID namespace cannot be made, a plain zygote serves ``init_sock`` the long way.
    """
    import gc
    import select
    import time

    # Every role's code, loaded once here so that the forks share it (the agent never loads it).
    import agent.runtime.child.intermediate  # noqa: F401
    from agent.runtime.child import process, rootfs

    rootfs.learn()  # what every container's set-up would read again in a fresh fork
    process.learn()

    # Forked children run briefly and exit or exec: a collection there would write to every
    # object's page and copy it. Freezing also keeps the spawner's own pages shared.
    gc.disable()
    gc.freeze()

    me = os.getpid()
    sockets = (sock, init_sock)
    waiting: dict[int, tuple[socket.socket, bool]] = {}  # "taken" pipe -> (socket, PID 1 zygote)
    pidns_ok = True  # False once a PID 1 zygote could not be made or did not live
    while True:
        for s in sockets:
            if any(s is w for w, _ in waiting.values()):
                continue
            taken_r, taken_w = os.pipe()
            pidns = s is init_sock and pidns_ok
            try:
                if pidns:
                    pidns = pidns_ok = _fork_pidns_zygote(sockets, taken_w)
                if not pidns:
                    _fork_zygote(s, sockets, taken_w, me)
            except OSError:
                os.close(taken_r)
                _reap(block=True)  # out of processes: wait for one of ours to go
                continue
            finally:
                os.close(taken_w)
            waiting[taken_r] = (s, pidns)
        if not waiting:  # no zygote could be forked, and no child of ours to wait for
            time.sleep(0.1)
            continue
        ready, _, _ = select.select(list(waiting), [], [])
        for taken_r in ready:
            word = os.read(taken_r, 1)  # b"t": taken, b"q": the agent is gone, b"": it died
            os.close(taken_r)
            _, pidns = waiting.pop(taken_r)
            if word == b"q":
                os._exit(0)
            if not word and pidns:
                pidns_ok = False  # it died before any request: serve creates the long way
        _reap()


def _fork_zygote(sock: socket.socket, sockets, taken_w: int, spawner: int) -> None:
    if os.fork() == 0:
        _zygote(sock, sockets, taken_w, pidns=False, spawner=spawner)


def _fork_pidns_zygote(sockets, taken_w: int) -> bool:
    """Clone the zygote as PID 1 of a new PID namespace and as the agent's child (CLONE_PARENT),
    so that the agent, not the spawner, reaps the container init it becomes. False when no
    such process can be made here."""
    try:
        pid = linux.clone3(linux.CLONE_PARENT | linux.CLONE_NEWPID)
    except OSError:
        return False
    if pid == 0:
        _zygote(sockets[1], sockets, taken_w, pidns=True)
    return True


def _reap(block: bool = False) -> None:
    """Reap finished intermediates (they exit as soon as they have forked)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0 or block:
            return


def _zygote(sock: socket.socket, sockets, taken: int, pidns: bool, spawner: int = 0) -> None:
    from agent.runtime.child import container_init

    try:
        premade: dict[int, int] = {}
        if pidns:  # the agent's child: it ends when the agent closes the socket
            premade = container_init.premake_namespaces()
            # its own session, which the init it becomes has (setsid also makes a scheduler
            # autogroup: from 0.03 up to 3 ms here); else the init makes it
            try:
                os.setsid()
            except OSError:
                pass
        else:
            # A zygote dies with its spawner: the requests queued for it then end (their sync
            # sockets close) instead of waiting for a zygote that never comes.
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != spawner:
                os._exit(0)
        msg, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)  # EINTR is retried (PEP 475)
        if not msg:
            os.write(taken, b"q")
            os._exit(0)
        os.write(taken, b"t")
        os.close(taken)
        for s in sockets:
            s.close()
        os.set_inheritable(fds[0], False)  # EOF for the agent when the child execs
        _child(msg, socket.socket(fileno=fds[0]), fds[1:], pidns, premade)
    finally:
        os._exit(1)


def _child(msg: bytes, sync: socket.socket, fds: list[int], pidns: bool,
           premade: dict[int, int] | None = None) -> None:
    """Serve one request in a zygote; ``pidns``: it is PID 1 of a new PID namespace, and only
    serves creates, as their init, in the namespaces it ``premade``."""
    from agent.runtime.child import container_init, intermediate
    from agent.runtime.child.common import fail

    try:
        req = protocol.decode_request(msg)
        if pidns and not isinstance(req, CreateRequest):
            fail(sync, f"spawner: {type(req).__name__} on the init socket")
        if isinstance(req, CreateRequest) and pidns:
            container_init.init_container(req, sync, fds, premade)
        elif isinstance(req, CreateRequest):
            intermediate.spawn_container(req, sync, fds)
        elif isinstance(req, ExecRequest):
            intermediate.spawn_exec(req, sync, fds)
        elif isinstance(req, TaskRequest):
            fn = sandbox_tasks.TASKS.get(req.name)
            if fn is None:
                fail(sync, f"no spawner task {req.name!r}")
            intermediate.spawn_task(fn, req.args, sync, fds)
        fail(sync, f"unknown spawner request {req!r}")
    except BaseException as exc:  # noqa: BLE001 - never return into the spawner's loop
        fail(sync, f"{type(exc).__name__}: {exc}")


SPAWNER_FD = 3  # the spawner's end of the agent's socket for all requests
INIT_FD = 4  # ... and of the one for CreateContainer in a new PID namespace


def start_spawner() -> "Spawner":
    """Start the spawner: a fresh ``python -S`` that imports only what it needs.

    Started with posix_spawn, so it can also be restarted later from the multi-threaded agent
    (Spawner.supervise). A small spawner forks faster (page tables, copy-on-write): about 0.6 ms
    instead of 1.6 ms here.

    Its imports run under SCHED_IDLE (``_MAIN``), and it takes the normal policy back once it is
    ready (``main``): on a guest's one vCPU they then use only the CPU time the agent leaves and
    no longer delay the agent's first listener. A request sent before it is ready waits in its
    socket, and the agent waiting for the answer leaves it the CPU. As root only: leaving
    SCHED_IDLE needs CAP_SYS_NICE.
    """
    spawner = Spawner(*_spawn())
    boottrace.mark("spawner-started")
    return spawner


_MAIN = """\
import os
idle = os.geteuid() == 0
if idle:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
from agent.runtime.spawner import main
main(idle)
"""


def _spawn() -> tuple[int, socket.socket, socket.socket]:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in (SPAWNER_FD, INIT_FD)]
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-S", "-c", _MAIN, str(os.getpid())]
    # Duplicated above the targets first, so that no dup2 overwrites a source still to be used.
    sources = [fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for _, theirs in pairs]
    try:
        pid = os.posix_spawn(sys.executable, argv, env, file_actions=[
            (os.POSIX_SPAWN_DUP2, src, target) for src, target in zip(sources, (SPAWNER_FD, INIT_FD))])
    except BaseException:
        for ours, _ in pairs:
            ours.close()
        raise
    finally:
        for src in sources:
            os.close(src)
        for _, theirs in pairs:
            theirs.close()
    return pid, pairs[0][0], pairs[1][0]


def main(idle: bool = False) -> None:
    """The spawner process (exec'd by start_spawner); ``idle``: it runs under SCHED_IDLE until ready."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != int(sys.argv[1]):
            os._exit(0)  # the agent (possibly PID 1) died before PR_SET_PDEATHSIG took hold
        from agent.runtime import seccomp

        seccomp.preload()  # mapped before any child pivots into a rootfs without it
        if idle:  # its zygotes, and the containers they become, get the normal policy
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        boottrace.mark("spawner-ready")
        socks = []
        for fd in (SPAWNER_FD, INIT_FD):
            socks.append(socket.socket(fileno=fd))
            os.set_inheritable(fd, False)
        _serve(*socks)
    finally:
        os._exit(1)


# --- the agent side -----------------------------------------------------------------------------

class Spawner:
    """The agent's handle on the spawner process (all methods run in the event loop)."""

    RESTARTS = 5  # at most this many restarts ...
    RESTART_WINDOW = 60.0  # ... within this many seconds; then requests fail

    def __init__(self, pid: int, sock: socket.socket, init_sock: socket.socket | None = None) -> None:
        self.pid = pid
        self.sock = sock  # every request
        self.init_sock = init_sock  # CreateContainer in a new PID namespace (None: on ``sock``)
        self.closed = False
        self.gone = ""  # why there is no spawner any more (requests fail with it)
        self.restarts: list[float] = []  # monotonic times of the restarts

    def supervise(self) -> None:
        """Restart the spawner when it dies (the OOM killer, a bug) while the agent serves.

        Requests in flight fail (their sync sockets close with the spawner's zygote); new ones go
        to the new spawner. A spawner that keeps dying is not restarted for ever: after RESTARTS
        restarts within RESTART_WINDOW seconds, requests fail with the reason.
        """
        from agent.runtime.reaper import REAPER

        REAPER.wait(self.pid).add_done_callback(self._exited)

    def _exited(self, fut) -> None:
        import logging
        import time

        if self.closed or fut.cancelled():
            return
        log = logging.getLogger(__name__)
        status = fut.result()
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.RESTART_WINDOW]
        old_pid = self.pid
        self._close_sockets()  # requests queued there end now, whatever follows
        if len(self.restarts) >= self.RESTARTS:
            self.gone = (f"the container spawner died {len(self.restarts) + 1} times in "
                         f"{self.RESTART_WINDOW:.0f} s (last wait status {status}); not restarted")
            log.error(self.gone)
            return
        try:
            self.pid, self.sock, self.init_sock = _spawn()
        except OSError as exc:
            self.gone = f"the container spawner died and could not be restarted: {exc}"
            log.error(self.gone)
            return
        self.restarts.append(now)
        log.error("the container spawner exited; started a new one",
                  extra={"fields": {"old_pid": old_pid, "status": status, "pid": self.pid}})
        self.supervise()

    def request(self, req: protocol.Request, fds: list[int] | tuple[int, ...] = (),
                new_pidns: bool = False) -> socket.socket:
        """Send ``req`` with ``fds``; returns the agent's end of the request's sync socket.

        ``new_pidns``: a create whose container gets a new PID namespace; its init is then the
        zygote itself, and its first report (the pid) comes from the init.
        """
        if self.gone:
            raise SpawnError(self.gone)
        sock = self.init_sock if new_pidns and self.init_sock is not None else self.sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(sock, [protocol.encode_request(req)], [theirs.fileno(), *fds])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    async def run_task(self, name: str, args: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> dict:
        """Run task ``name`` in a double-forked child; its reply, plus ``"pid"`` (the worker's)."""
        sync = self.request(TaskRequest(name, args), fds)
        with sync:
            pid = await receive_pid(sync)
            reply = await receive(sync)
        if isinstance(reply, Failed):
            raise SpawnError(f"task {name}: {reply.error}")
        if not isinstance(reply, Reply):
            raise SpawnError(f"task {name}: exited without a reply ({reply!r})")
        return {**reply.data, "pid": pid}

    def close(self) -> None:
        self.closed = True
        self._close_sockets()

    def _close_sockets(self) -> None:
        self.sock.close()
        if self.init_sock is not None:
            self.init_sock.close()


async def receive(sync: socket.socket) -> protocol.Step | None:
    """The next step on a (non-blocking) sync socket, or None at EOF."""
    import asyncio

    data = await asyncio.get_running_loop().sock_recv(sync, MAX_MESSAGE)
    return protocol.decode(data) if data else None


async def receive_pid(sync: socket.socket) -> int:
    """The first step of every request: the pid of the process it made."""
    msg = await receive(sync)
    if msg is None:
        raise SpawnError("the spawner's child exited without reporting")
    if isinstance(msg, Failed):
        raise SpawnError(msg.error)
    if not isinstance(msg, Pid):
        raise SpawnError(f"spawner protocol: expected the pid, got {msg!r}")
    return msg.pid
