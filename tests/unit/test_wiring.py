"""agent.wiring's start-up order: the listeners come before the rest of the agent is imported, and
that import runs aside while the event loop serves."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from agent import wiring


def test_the_event_loop_runs_while_the_agent_imports_aside(tmp_path, monkeypatch):
    # a module whose import waits until the event loop has run a callback: import_aside returns
    # only if the loop kept turning during the import (else the wait gives up and the import fails)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "aside_probe.py").write_text(
        "import aside_gate\nif not aside_gate.EVENT.wait(30):\n    raise RuntimeError('the loop did not run')\n")
    gate = type(sys)("aside_gate")
    gate.EVENT = threading.Event()
    monkeypatch.setitem(sys.modules, "aside_gate", gate)

    async def main():
        asyncio.get_running_loop().call_later(0.01, gate.EVENT.set)
        await wiring.import_aside(("aside_probe",))

    try:
        asyncio.run(main())
        assert "aside_probe" in sys.modules
    finally:
        sys.modules.pop("aside_probe", None)


def test_an_import_that_fails_aside_is_raised_to_the_builder():
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_wiring"):
        asyncio.run(wiring.import_aside(("no_such_module_for_wiring",)))


def test_build_modules_are_what_build_uses():
    # every module build() and all_handlers() import is imported aside (none on the event loop)
    import ast
    import inspect

    names = set()
    for fn in (wiring.build, wiring.all_handlers, wiring.uevent_listener):
        for node in ast.walk(ast.parse(inspect.getsource(fn).lstrip())):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("agent."):
                names.add(node.module)
            if isinstance(node, ast.ImportFrom) and node.module == "agent.rpc":
                names |= {f"agent.rpc.{a.name}" for a in node.names if a.name != "handlers"}
    names.discard("agent.rpc")
    assert names <= set(wiring.BUILD_MODULES), names - set(wiring.BUILD_MODULES)
