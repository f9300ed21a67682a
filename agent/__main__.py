"""Entry point: ``python -m agent`` and the ``kata-agent`` console script.

Order matters. Settings are read and, as PID 1, the guest is set up (its forks run Python, so
they come while this process is single-threaded); then the container spawner is started, a process
of its own (agent.runtime.spawner); only then does agent.wiring build the other components and
start the listeners. grpcio, which starts threads, comes later still, with the first gRPC
connection (agent.server).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from agent import config as config_mod
from agent import linux
from agent import log as log_mod
from agent.runtime.spawner import start_spawner


def _become_subreaper() -> None:
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_mod.load(argv)
    except config_mod.ConfigError as exc:
        print(f"kata-agent: {exc}", file=sys.stderr)
        return 2
    log_mod.setup(cfg.log_level)
    log_port = None
    if cfg.log_addr is not None:
        from agent import logport

        log_port = logport.attach(cfg.log_addr)  # buffers until it listens, once the forks are done
    log_mod.report_settings(cfg)
    pid1 = os.getpid() == 1
    if pid1:
        from agent import init

        init.pid1_setup(cfg.cmdline, cfg)
    _become_subreaper()

    spawner = start_spawner()
    # imported once the spawner runs (its start overlaps these imports); threads (grpcio,
    # executors) may start after this: no fork that runs Python
    from agent import wiring

    if log_port is not None:
        try:
            log_port.listen()
        except OSError as exc:
            logging.getLogger().removeHandler(log_port)
            logging.getLogger("agent").error("log port not served: %s", exc)
            log_port = None

    try:
        return asyncio.run(wiring.run(cfg, spawner))
    finally:
        if log_port is not None:
            log_port.close()  # what is buffered goes to a connected host first
        if pid1:
            from agent import init

            init.poweroff()


if __name__ == "__main__":
    sys.exit(main())
