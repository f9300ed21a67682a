"""Entry point: ``python -m agent`` and the ``kata-agent`` console script.

Order matters. Settings are read and, as PID 1, the guest is set up (its forks run Python, so
they come while this process is single-threaded); then the container spawner is started, a process
of its own (agent.runtime.spawner); only then do the listeners start. grpcio, which starts
threads, comes later still, with the first gRPC connection (agent.server).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys

from agent import config as config_mod
from agent import linux
from agent import log as log_mod


def _become_subreaper() -> None:
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_mod.load(argv)
    except config_mod.ConfigError as exc:
        print(f"kata-agent: {exc}", file=sys.stderr)
        return 2
    log_mod.setup(cfg.log_level)
    pid1 = os.getpid() == 1
    if pid1:
        from agent import init

        init.pid1_setup(cfg.cmdline)
    _become_subreaper()

    spawner = None
    try:
        spawner_mod = importlib.import_module("agent.runtime.spawner")
    except ModuleNotFoundError as exc:
        if exc.name != "agent.runtime.spawner":
            raise
    else:
        spawner = spawner_mod.start_spawner(cfg)

    from agent import server  # threads (grpcio, executors) may start after this: no fork that runs Python

    try:
        return asyncio.run(server.serve(cfg, spawner=spawner))
    finally:
        if pid1:
            from agent import init

            init.poweroff()


if __name__ == "__main__":
    sys.exit(main())
