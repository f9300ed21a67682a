"""agent.boottrace: marks and import records in the kernel log's format, loaders put back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, body: str) -> tuple[list[str], dict]:
    """Run ``body`` in a fresh interpreter with boottrace writing to a file; its records and
    the JSON it printed."""
    log = tmp_path / "dev" / "kmsg"
    pkg = tmp_path / "pkgs"
    (pkg / "slowpkg").mkdir(parents=True)
    (pkg / "slowpkg" / "__init__.py").write_text("import time\ntime.sleep(0.03)\nfrom slowpkg import inner\n")
    (pkg / "slowpkg" / "inner.py").write_text("import time\ntime.sleep(0.02)\n")
    (pkg / "slowpkg" / "data.txt").write_text("resource\n")
    code = textwrap.dedent(f"""
        import json, os, sys, time
        sys.path[:0] = [{str(ROOT)!r}, {str(pkg)!r}]
        from agent import boottrace
        boottrace.KMSG = {str(log)!r}
        boottrace.MIN_IMPORT = 0.015
        out = {{}}
    """) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    return lines, json.loads(r.stdout.splitlines()[-1])


def test_marks_wait_for_the_log_then_go_out_in_order(tmp_path):
    lines, _ = _run(tmp_path, """
        boottrace.start(time.monotonic())
        boottrace.mark("early")
        os.mkdir(os.path.dirname(boottrace.KMSG)); open(boottrace.KMSG, "w").close()
        boottrace.mark("late", extra="x")
    """)
    assert [l.split()[2] for l in lines] == ["init-start", "early", "late"]
    assert all(l.startswith("<7>kata-boot: mark ") for l in lines)
    assert "wall=" in lines[0] and "extra=x" in lines[2]
    monos = [float(l.split("mono=")[1].split()[0]) for l in lines]
    assert monos == sorted(monos)


def test_imports_are_timed_with_their_importer_and_loaders_put_back(tmp_path):
    lines, out = _run(tmp_path, """
        os.mkdir(os.path.dirname(boottrace.KMSG)); open(boottrace.KMSG, "w").close()
        boottrace.start()
        import slowpkg, slowpkg.inner
        from importlib import resources
        out["loader"] = type(slowpkg.__loader__).__name__
        out["spec_loader"] = type(slowpkg.__spec__.loader).__name__
        out["inner_loader"] = type(slowpkg.inner.__loader__).__name__
        out["data"] = resources.files("slowpkg").joinpath("data.txt").read_text()
    """)
    imports = {l.split()[2]: l for l in lines if l.startswith("<7>kata-boot: import ")}
    assert "slowpkg" in imports, lines
    assert " in=-" in imports["slowpkg"]
    seconds = float(imports["slowpkg"].split(" s=")[1].split()[0])
    assert seconds >= 0.05  # its own sleep and its submodule's
    # slowpkg.inner is not watched (a submodule of a third-party package): timed within slowpkg
    assert "slowpkg.inner" not in imports
    assert out == {"loader": "SourceFileLoader", "spec_loader": "SourceFileLoader",
                   "inner_loader": "SourceFileLoader", "data": "resource\n"}


def test_nothing_is_recorded_unless_started_and_not_in_a_forked_child(tmp_path):
    lines, out = _run(tmp_path, """
        os.mkdir(os.path.dirname(boottrace.KMSG)); open(boottrace.KMSG, "w").close()
        boottrace.mark("before-start")
        out["enabled_before"] = boottrace.enabled()
        boottrace.start()
        pid = os.fork()
        if pid == 0:
            boottrace.mark("in-child")
            import slowpkg
            os._exit(0)
        os.waitpid(pid, 0)
        boottrace.mark("parent")
    """)
    names = [l.split()[2] for l in lines]
    assert out["enabled_before"] is False
    assert names == ["init-start", "parent"]


def test_records_from_threads_at_once_all_go_out(tmp_path):
    """The agent imports part of itself in a thread while the event loop imports grpcio in
    another: both write records at once. Each record goes out once, and neither thread fails
    (they shared the list of pending records unlocked: IndexError, and the agent stopped)."""
    lines, out = _run(tmp_path, """
        import threading
        os.mkdir(os.path.dirname(boottrace.KMSG)); open(boottrace.KMSG, "w").close()
        boottrace.start()
        errors = []

        def marks(name):
            try:
                for i in range(2000):
                    boottrace.mark(f"{name}-{i}")
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=marks, args=(n,)) for n in ("a", "b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["errors"] = errors
    """)
    assert out["errors"] == []
    names = [l.split()[2] for l in lines[1:]]
    assert sorted(names) == sorted(f"{n}-{i}" for n in "abc" for i in range(2000))
