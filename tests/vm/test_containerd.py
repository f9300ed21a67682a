"""containerd runs containers in our QEMU guests: a real containerd (Debian's), private to this
module, drives containerd-shim-kata-py-v2 through ``ctr``.

One containerd for the module; the shim's VMs start from one template, made by the first task.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid

import pytest

from tests.vm.conftest import _ensure_image
from tests.vm.containerd_support import IMAGE, NAMESPACE, Containerd

MB = 1 << 20


@pytest.fixture(scope="module")
def ctrd():
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    _ensure_image("x86_64")
    c = Containerd()
    try:
        c.start()
        c.import_image()
        yield c
    finally:
        c.stop()


def new_id() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def test_run_rm_echo(ctrd):
    r = ctrd.ctr(*ctrd.run_args("--rm", IMAGE, new_id(), "echo", "hello from the guest"))
    assert r.returncode == 0
    assert r.stdout == b"hello from the guest\n"
    assert ctrd.leftovers() == []


def test_run_rm_exit_status(ctrd):
    r = ctrd.ctr(*ctrd.run_args("--rm", IMAGE, new_id(), "sh", "-c", "echo out; echo err >&2; exit 7"),
                 check=False)
    assert r.returncode == 7, (r.stdout, r.stderr, ctrd.log_tail())
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    assert ctrd.leftovers() == []


def test_run_rm_a_megabyte_on_stdout_and_stderr(ctrd):
    script = f"head -c {MB} /dev/zero | tr '\\0' a; head -c {MB} /dev/zero | tr '\\0' b >&2"
    r = ctrd.ctr(*ctrd.run_args("--rm", IMAGE, new_id(), "sh", "-c", script))
    assert len(r.stdout) == MB and set(r.stdout) == {ord("a")}
    assert len(r.stderr) == MB and set(r.stderr) == {ord("b")}


def test_run_rm_stdin(ctrd):
    r = ctrd.ctr(*ctrd.run_args("--rm", IMAGE, new_id(), "sh", "-c", "tr a-z A-Z"), input=b"through stdin\n")
    assert r.stdout == b"THROUGH STDIN\n"


def test_the_rootfs_is_the_snapshot_not_a_copy(ctrd):
    """A file the container writes lands in containerd's overlay snapshot (the upper directory)."""
    cid = new_id()
    marker = f"written-by-{cid}"
    ctrd.ctr(*ctrd.run_args(IMAGE, cid, "sh", "-c", f"echo {marker} > /marker"))
    try:
        snapshots = ctrd.dir / "root" / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        found = [p for p in snapshots.glob("*/fs/marker") if p.read_text().strip() == marker]
        assert len(found) == 1, list(snapshots.glob("*/fs/*"))
    finally:
        ctrd.ctr("task", "delete", cid, check=False)
        ctrd.ctr("containers", "rm", cid)
    assert ctrd.leftovers() == []


@pytest.fixture
def events(ctrd):
    """``ctr events`` for the duration of a test: the topics containerd received."""
    import subprocess

    out = ctrd.dir / f"events-{uuid.uuid4().hex[:6]}.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(["ctr", "--address", str(ctrd.socket), "events"], stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def topics(cid: str) -> list[str]:  # lines: TIMESTAMP (several words) NAMESPACE TOPIC EVENT-JSON
        found = []
        for line in out.read_text().splitlines():
            words = [w for w in line.split() if w.startswith("/tasks/")]
            if words and cid in line:
                found.append(words[0])
        return found

    try:
        yield topics
    finally:
        proc.terminate()
        proc.wait(10)


def _task_status(ctrd, cid: str) -> str:
    for line in ctrd.ctr("task", "ls").stdout.decode().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return ""


def _wait_status(ctrd, cid: str, want: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := _task_status(ctrd, cid)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


def test_detached_task_exec_ps_pause_metrics_kill_delete(ctrd, events):
    cid = new_id()
    ctrd.ctr(*ctrd.run_args("-d", IMAGE, cid, "sleep", "600"))
    try:
        assert _task_status(ctrd, cid) == "RUNNING"
        r = ctrd.ctr("task", "exec", "--exec-id", "e1", "--fifo-dir", str(ctrd.fifo_dir), cid,
                     "sh", "-c", "echo exec-out; echo exec-err >&2; ps -o pid,args; exit 3", check=False)
        assert r.returncode == 3, (r.stdout, r.stderr)
        out = r.stdout.decode()
        assert out.startswith("exec-out\n") and r.stderr == b"exec-err\n"
        assert any(line.split()[:3] == ["1", "sleep", "600"] for line in out.splitlines()), out
        r = ctrd.ctr("task", "exec", "--exec-id", "e2", "--fifo-dir", str(ctrd.fifo_dir), cid, "cat",
                     input=b"stdin of an exec\n")
        assert r.stdout == b"stdin of an exec\n"

        pids = ctrd.ctr("task", "ps", cid).stdout.decode().split()
        assert pids[0] == "PID" and pids[2].isdigit(), pids

        ctrd.ctr("task", "pause", cid)
        assert _task_status(ctrd, cid) == "PAUSED"
        ctrd.ctr("task", "resume", cid)
        assert _task_status(ctrd, cid) == "RUNNING"

        metrics = ctrd.ctr("task", "metrics", "--format", "json", cid).stdout.decode()
        assert '"pids"' in metrics and '"current"' in metrics and '"memory"' in metrics, metrics

        ctrd.ctr("task", "kill", "-s", "KILL", cid)
        assert _wait_status(ctrd, cid, "STOPPED") == "STOPPED"
        r = ctrd.ctr("task", "delete", cid)
        assert b"exit code 137" in r.stderr, r.stderr  # ctr 1.6 warns with the status, exits 0
        ctrd.ctr("containers", "rm", cid)
    finally:
        ctrd.ctr("task", "delete", "--force", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)
    assert ctrd.leftovers() == []
    seen = events(cid)
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/paused",
                  "/tasks/resumed", "/tasks/exit", "/tasks/delete"):
        assert topic in seen, (topic, seen)
    assert seen.index("/tasks/create") < seen.index("/tasks/start") < seen.index("/tasks/delete")


def test_exec_into_a_missing_task_is_refused(ctrd):
    r = ctrd.ctr("task", "exec", "--exec-id", "x", "--fifo-dir", str(ctrd.fifo_dir), "no-such-task", "true",
                 check=False)
    assert r.returncode != 0 and b"not found" in r.stderr.lower()


def test_run_tty_in_tmux_prompt_command_resize_exit(ctrd, tmp_path):
    """`ctr run -t ... sh` is an interactive shell; a resized window reaches it (ResizePty)."""
    import shlex
    import subprocess

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    cid = new_id()
    status = tmp_path / "status"
    argv = ["ctr", "--address", str(ctrd.socket), "--namespace", NAMESPACE,
            *ctrd.run_args("--rm", "-t", IMAGE, cid, "sh")]
    shell = " ".join(shlex.quote(a) for a in argv) + f"; echo $? > {shlex.quote(str(status))}; sleep 600"
    t = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    subprocess.run(t + ["new-session", "-d", "-x", "90", "-y", "25", "-s", "s", shell], check=True)

    def pane() -> str:
        return subprocess.run(t + ["capture-pane", "-p", "-t", "s"], capture_output=True, text=True).stdout

    def wait_for(pred, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"{what}:\n{pane()}\n{ctrd.log_tail()}"
            time.sleep(0.2)

    try:
        wait_for(lambda: "/ #" in pane(), "no shell prompt")
        subprocess.run(t + ["send-keys", "-t", "s", "echo hello-$((6*7)); stty size", "Enter"], check=True)
        wait_for(lambda: "25 90" in [line.strip() for line in pane().splitlines()], "no first stty size")
        assert "hello-42" in [line.strip() for line in pane().splitlines()]
        subprocess.run(t + ["resize-window", "-t", "s", "-x", "120", "-y", "40"], check=True)
        time.sleep(0.5)  # let SIGWINCH reach ctr and the resize reach the guest before asking
        subprocess.run(t + ["send-keys", "-t", "s", "clear; stty size", "Enter"], check=True)
        wait_for(lambda: "40 120" in [line.strip() for line in pane().splitlines()], "the resize did not arrive")
        subprocess.run(t + ["send-keys", "-t", "s", "exit 5", "Enter"], check=True)
        wait_for(lambda: status.exists() and status.read_text().strip(), "ctr did not return")
        assert status.read_text().strip() == "5", pane()
    finally:
        subprocess.run(t + ["kill-server"], capture_output=True)
    assert ctrd.leftovers() == []


def _shim_pid(cid: str) -> int:
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kata_agent_client.shim" in args and b"serve" in args and cid.encode() in args:
            return int(proc.name)
    raise AssertionError(f"no shim process for {cid}")


def test_kill_9_of_the_shim_leaves_nothing_behind(ctrd):
    """containerd sees its shim die and runs `delete`, which removes the VM, virtiofsd, the rootfs
    mount, the run directory and the socket the dead shim left."""
    import signal

    cid = new_id()
    ctrd.ctr(*ctrd.run_args("-d", IMAGE, cid, "sleep", "600"))
    try:
        run_dirs = list(ctrd.shim_dir.iterdir())
        assert run_dirs and ctrd.leftovers() != []  # a VM, a mount, a socket: there is something to clean
        os.kill(_shim_pid(cid), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while ctrd.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ctrd.leftovers() == []
        assert _task_status(ctrd, cid) in ("STOPPED", "")
    finally:
        ctrd.ctr("task", "delete", "--force", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)
    assert ctrd.leftovers() == []


def test_exec_leaving_a_child_that_holds_its_output_returns(ctrd):
    """The exec's shell exits while a child it left holds stdout open: ctr gets the exit and the
    output written before it, and does not hang on the open stream (Kata #8026)."""
    cid = new_id()
    ctrd.ctr(*ctrd.run_args("-d", IMAGE, cid, "sleep", "600"))
    try:
        r = ctrd.ctr("task", "exec", "--exec-id", "bg", "--fifo-dir", str(ctrd.fifo_dir), cid,
                     "sh", "-c", "sleep 600 & echo started; exit 4", check=False, timeout=120)
        assert r.returncode == 4 and r.stdout == b"started\n", (r.stdout, r.stderr)
    finally:
        ctrd.ctr("task", "kill", "-s", "KILL", cid, check=False)
        _wait_status(ctrd, cid, "STOPPED")
        ctrd.ctr("task", "delete", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)
    assert ctrd.leftovers() == []
