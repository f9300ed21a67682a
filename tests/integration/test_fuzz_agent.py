"""Hostile input: every AgentService method fuzzed with generated messages and with raw bytes.

The agent runs confined (tests/reliability/isolated.py: own mount, net, UTS, IPC and cgroup
namespaces; the machine's file systems read-only in its mount namespace). Invariants after every
request: the agent lives, the reply is OK or a status with a message (not UNKNOWN, not an escaped
Python exception, not an attempt to write outside its state root), Health.Check answers. After
each method: its mounts, fds, threads, children and cgroups are back to the baseline, and the
machine (mounts, /etc, hostname, links, routes) is unchanged.

Budget: FUZZ_EXAMPLES examples per method and per kind (default 30); bench/fuzz_long.py runs more.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import ttrpc
from agent.config import Address
from agent.protocols import health_pb2, ttrpc_pb2
from kata_agent_client.client import TtrpcError, dial
from tests.reliability import protofuzz
from tests.reliability.hostile import (FUZZABLE, MACHINE_WIDE, OWN_AGENT, SERVICE, judge,
                                       request_class, response_class, scrub, timeout_for)
from tests.reliability.invariants import AgentState, MachineState, settle
from tests.reliability.isolated import IsolatedAgent

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
CALL_TIMEOUT = 15.0
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
STATS: Counter = Counter()


class Conn:
    """A connection to the agent's unix socket over ``proto``, for raw request bodies."""

    def __init__(self, sock: pathlib.Path, proto: str) -> None:
        self.proto = proto
        if proto == "grpc":
            self.channel = grpc.insecure_channel(f"unix:{sock}", options=[
                ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        else:
            self.client = ttrpc.Client(dial(Address("unix", host=str(sock))))

    def call(self, service: str, method: str, data: bytes, timeout: float) -> bytes:
        """One call with a raw body; raises grpc.RpcError (a TtrpcError on ttrpc)."""
        if self.proto == "grpc":
            return self.channel.unary_unary(f"/{service}/{method}")(data, timeout=timeout)
        try:
            return self.client.call(service, method, data, timeout=timeout)
        except ttrpc.Status as status:
            raise TtrpcError(status) from None

    def close(self) -> None:
        (self.channel if self.proto == "grpc" else self.client).close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Target:
    """The confined agent, a raw connection to it over ``proto`` (gRPC or ttrpc) and its baseline."""

    def __init__(self, workdir: pathlib.Path, proto: str) -> None:
        self.machine = MachineState.take()
        self.agent = IsolatedAgent(workdir)
        self.proto = proto
        self.conn = Conn(self.agent.sock, proto)
        self.health()
        self.warm_up()
        self.files = set(os.listdir(workdir))
        self.baseline = AgentState.take(self.agent.pid)
        self.cgroups = self.agent.cgroups()

    def health(self) -> None:
        reply = self.conn.call("grpc.Health", "Check", health_pb2.CheckRequest().SerializeToString(), 10)
        assert health_pb2.HealthCheckResponse.FromString(reply).status == health_pb2.HealthCheckResponse.SERVING

    def warm_up(self) -> None:
        """One empty request per method: what the agent opens once on first use (a netlink
        socket, a worker thread) belongs in the baseline; what grows after that is a leak."""
        for method in FUZZABLE:
            msg = request_class(method)()
            _, err = self.send(method, msg)
            self.undo(method, msg, err)
        time.sleep(0.5)

    def raw(self, method: str, data: bytes):
        """Send ``data`` as the request body; (reply bytes, None) or (None, RpcError)."""
        try:
            return self.conn.call(SERVICE.full_name, method, data, timeout_for(method, CALL_TIMEOUT)), None
        except grpc.RpcError as err:
            return None, err

    def send(self, method: str, msg):
        reply, err = self.raw(method, msg.SerializeToString())
        return (None if reply is None else response_class(method).FromString(reply)), err

    def after(self, method: str, what: str, err) -> None:
        STATS[(method, what, "OK" if err is None else err.code().name)] += 1
        problem = judge(method, err)
        assert self.agent.alive(), f"{method}: agent died:\n{self.agent.logs()[-4000:]}"
        assert problem is None, problem
        self.health()

    def undo(self, method: str, msg, err) -> None:
        """Remove what a successful request created, as its owner would."""
        if err is not None:
            return
        if method == "CreateContainer":
            _, e = self.send("RemoveContainer", request_class("RemoveContainer")(
                container_id=msg.container_id, timeout=5))
            assert e is None, f"RemoveContainer after a successful fuzzed create: {e.details()}"
        elif method == "CreateSandbox":
            _, e = self.send("DestroySandbox", request_class("DestroySandbox")())
            assert e is None, f"DestroySandbox after a successful fuzzed create: {e.details()}"

    def check_back_to_baseline(self, method: str) -> None:
        problems = settle(self.agent.pid, self.baseline, timeout=10)
        extra_cg = self.agent.cgroups() - self.cgroups
        if extra_cg:
            problems.append(f"cgroups left: {sorted(extra_cg)}")
        new_files = set(os.listdir(self.agent.work)) - self.files
        if new_files:
            problems.append(f"files created in the agent's working directory: {sorted(new_files)}")
        problems += self.machine.diff(MachineState.take())
        assert not problems, f"after fuzzing {method}: " + "; ".join(problems)


@pytest.fixture(scope="module", params=["ttrpc", "grpc"])
def target(request, tmp_path_factory):
    t = Target(tmp_path_factory.mktemp("fuzz"), request.param)
    yield t
    t.conn.close()
    rc = t.agent.stop()
    out = os.environ.get("FUZZ_STATS")
    if out:
        with open(out, "a") as f:
            for (method, what, code), n in sorted(STATS.items()):
                f.write(json.dumps({"proto": t.proto, "method": method, "kind": what, "code": code,
                                    "n": n}) + "\n")
    STATS.clear()
    assert rc == 0, f"agent exited with {rc}:\n{t.agent.logs()[-4000:]}"


@pytest.mark.parametrize("method", FUZZABLE)
def test_fuzz_messages(target, method):
    desc = SERVICE.methods_by_name[method].input_type

    @FUZZ
    @given(msg=protofuzz.messages(desc))
    def run(msg):
        scrub(msg)
        _, err = target.send(method, msg)
        target.after(method, "message", err)
        target.undo(method, msg, err)

    run()
    target.check_back_to_baseline(method)


def _unparseable(method: str):
    cls = request_class(method)

    def fails(data: bytes) -> bool:
        try:
            cls.FromString(data)
        except Exception:  # noqa: BLE001 - any parse failure will do
            return True
        return False

    return protofuzz.raw_bytes(SERVICE.methods_by_name[method].input_type).filter(fails)


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods if m.name not in OWN_AGENT])
def test_fuzz_raw_bytes(target, method):
    """Garbage, truncated and bit-flipped bodies. Machine-wide methods only get bodies that cannot
    parse, so nothing valid reaches them."""
    desc = SERVICE.methods_by_name[method].input_type
    strategy = _unparseable(method) if method in MACHINE_WIDE else protofuzz.raw_bytes(desc)

    @FUZZ
    @given(data=strategy)
    def run(data):
        if method not in MACHINE_WIDE:
            msg = request_class(method).FromString(data) if _parses(method, data) else None
            if msg is not None:
                before = msg.SerializeToString()
                scrub(msg)
                if msg.SerializeToString() != before:
                    data = msg.SerializeToString()
        reply, err = target.raw(method, data)
        target.after(method, "raw", err)
        if err is None:
            response_class(method).FromString(reply)  # a valid reply
            target.undo(method, request_class(method).FromString(data), err)

    run()
    target.check_back_to_baseline(method)


def _garbage_frames(sock_path, seed: int) -> list[str]:
    """Frames whose envelope is garbage, on a raw connection: each is answered with a status
    (never UNKNOWN or INTERNAL), or ignored; the connection stays usable."""
    import random
    import socket as so

    rnd = random.Random(seed)
    codes = []
    with so.socket(so.AF_UNIX, so.SOCK_STREAM) as s:
        s.settimeout(CALL_TIMEOUT)
        s.connect(str(sock_path))
        reader = ttrpc.FrameReader()
        for n in range(20):
            body = rnd.randbytes(rnd.randrange(0, 64))
            s.sendall(ttrpc.frame(2 * n + 1, ttrpc.REQUEST, body))
        s.sendall(ttrpc.frame(41, ttrpc.REQUEST, ttrpc_pb2.Request(
            service="grpc.Health", method="Check").SerializeToString()))
        while True:  # every answer up to the Health.Check sent last
            frames = list(reader.feed(s.recv(65536)))
            done = False
            for stream_id, kind, body in frames:
                status = ttrpc_pb2.Response.FromString(body).status
                codes.append(status.code)
                assert status.code not in (2, 13), f"garbage envelope answered {status.code}: {status.message}"
                done = done or stream_id == 41
            if done:
                break
    return [str(c) for c in codes]


def _parses(method: str, data: bytes) -> bool:
    try:
        request_class(method).FromString(data)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_many_connections_and_concurrent_garbage(target):
    """50 connections at once, each sending a burst of garbage bodies, and (ttrpc) garbage
    frames and envelopes; then everything is released."""
    import concurrent.futures as cf

    def burst(i):
        with Conn(target.agent.sock, target.proto) as conn:
            codes = []
            for j, method in enumerate(FUZZABLE[:10]):
                try:
                    conn.call(SERVICE.full_name, method, bytes([i, j]) * 7 + b"\xff", CALL_TIMEOUT)
                    codes.append("OK")
                except grpc.RpcError as err:
                    assert judge(method, err) is None, judge(method, err)
                    codes.append(err.code().name)
            if target.proto == "ttrpc":
                codes += _garbage_frames(target.agent.sock, i)
            return codes

    start = time.monotonic()
    with cf.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(burst, range(50)))
    assert len(results) == 50 and time.monotonic() - start < 60
    target.health()
    target.check_back_to_baseline("50 concurrent connections")


# --- SetPolicy, against an agent of its own ------------------------------------------------------

_METHOD_NAMES = [m.name for m in SERVICE.methods]
_PROBED = ["StatsContainer", "SignalProcess", "ExecProcess"]  # the requests sent under each policy
_FIELDS = st.one_of(st.sampled_from(["container_id", "exec_id", "signal", "process.User.UID",
                                     "process.Args", "OCI.Hostname", "nope.nope"]),
                    st.lists(st.sampled_from(["OCI", "Annotations", "process", "x"]), max_size=3),
                    st.integers())
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12),
                    st.lists(st.one_of(st.integers(), st.text(max_size=6)), max_size=3))
_TEXT = st.text(max_size=12)
_FITTING = st.one_of(  # a kind with a value of its type, on fields every probed request has
    st.tuples(st.sampled_from(["equals", "not_equals", "contains", "prefix"]), _TEXT),
    st.tuples(st.just("in"), st.lists(_TEXT, max_size=3)),
    st.tuples(st.just("matches"), st.sampled_from(["fuzz.*", ".*", "[a-z-]+", "(", "a{2,}|b"])),
    st.tuples(st.just("exists"), st.booleans()))
_FITTING_LEAF = st.builds(lambda kv: {"field": "container_id", kv[0]: kv[1]}, _FITTING)
_LEAF = st.one_of(
    _FITTING_LEAF, _FITTING_LEAF,
    st.builds(lambda f, kind, value: {"field": f, kind: value}, _FIELDS,
              st.sampled_from(["equals", "not_equals", "in", "contains", "matches", "prefix",
                               "exists", "bogus"]), _VALUES))
_PREDICATES = st.recursive(_LEAF, lambda inner: st.one_of(
    st.builds(lambda xs: {"all": xs}, st.lists(inner, max_size=3)),
    st.builds(lambda xs: {"any": xs}, st.lists(inner, max_size=3)),
    st.builds(lambda x: {"not": x}, inner)), max_leaves=6)
_RULES = st.fixed_dictionaries(
    {"name": st.one_of(st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10), st.just("")),
     "method": st.one_of(st.sampled_from(_PROBED), st.lists(st.sampled_from(_PROBED), max_size=3),
                         st.just("*"), st.sampled_from(_METHOD_NAMES), st.text(max_size=8)),
     "action": st.sampled_from(["allow", "deny", "allow", "deny", "maybe"])},
    optional={"when": _PREDICATES})
# The first rule keeps SetPolicy allowed, so that each example can put allow-all back (a state
# left by one example would fail every later one); the rest may deny anything. Text that is not a
# policy document comes too.
KEEP = {"name": "fuzz-keeps-setpolicy", "method": "SetPolicy", "action": "allow"}
_DOCUMENTS = st.fixed_dictionaries({}, optional={
    "default": st.sampled_from(["allow", "deny", "", 0]), "rules": st.lists(_RULES, max_size=4),
    "version": st.one_of(st.text(max_size=4), st.integers())})
POLICIES = st.one_of(_DOCUMENTS.map(lambda d: json.dumps({**d, "rules": [KEEP, *d.get("rules", [])]})),
                     st.text(max_size=200))
ALLOW_ALL = json.dumps({"default": "allow"})


@pytest.mark.parametrize("proto", ["ttrpc", "grpc"])
def test_fuzz_set_policy(tmp_path, proto):
    """Generated policies (well-formed and not, with random rules and predicates), each followed by
    requests that the policy decides on, then raw bodies. A policy may deny SetPolicy itself and
    lock every later request out: hence an agent of its own, not the module's."""
    t = Target(tmp_path / "policy", proto)
    try:
        probes = [("StatsContainer", request_class("StatsContainer")(container_id="fuzz-none")),
                  ("SignalProcess", request_class("SignalProcess")(container_id="fuzz-none", signal=9)),
                  ("ExecProcess", request_class("ExecProcess")(container_id="fuzz-none", exec_id="e"))]

        @FUZZ
        @given(text=POLICIES)
        def run(text):
            _, err = t.send("SetPolicy", request_class("SetPolicy")(policy=text))
            t.after("SetPolicy", "policy", err)
            for method, msg in probes:
                _, err = t.send(method, msg)
                t.after(method, "under a fuzzed policy", err)
            _, err = t.send("SetPolicy", request_class("SetPolicy")(policy=ALLOW_ALL))
            assert err is None, f"allow-all not taken back after {text!r}: {err.details()}"

        run()

        @FUZZ
        @given(data=protofuzz.raw_bytes(SERVICE.methods_by_name["SetPolicy"].input_type))
        def raw(data):
            _, err = t.raw("SetPolicy", data)
            t.after("SetPolicy", "raw", err)
            t.send("SetPolicy", request_class("SetPolicy")(policy=ALLOW_ALL))

        raw()
        t.check_back_to_baseline("SetPolicy")
        # The lock-out this agent is here for: after a deny-all, SetPolicy itself is refused.
        _, err = t.send("SetPolicy", request_class("SetPolicy")(policy=json.dumps({"default": "deny"})))
        assert err is None
        _, err = t.send("SetPolicy", request_class("SetPolicy")(policy=ALLOW_ALL))
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        t.health()
    finally:
        t.conn.close()
        rc = t.agent.stop()
    assert rc == 0, f"agent exited with {rc}:\n{t.agent.logs()[-4000:]}"
