"""Entry point: ``python -m agent`` and the ``kata-agent`` console script.

Order matters. Settings are read and, as PID 1, the guest is set up (its forks run Python, so
they come while this process is single-threaded); then the container spawner is started, a process
of its own (agent.runtime.spawner); only then does agent.wiring build the other components and
start the listeners. grpcio, which starts threads, comes later still, with the first gRPC
connection (agent.server).
"""

from __future__ import annotations

import logging
import os
import sys


def _asyncio_without_tls():
    """asyncio, imported while ``ssl`` is hidden. asyncio imports ssl (OpenSSL: 4 MB of RSS, 0.06 s
    of a TCG guest's boot) for TLS, which the agent never asks of it; with ssl hidden its modules
    bind ``ssl = None``. Later imports of ssl (prometheus-client's) load it as usual."""
    hide = "ssl" not in sys.modules
    if hide:
        sys.modules["ssl"] = None  # ``import ssl`` raises ImportError, which asyncio expects
    try:
        import asyncio
    finally:
        if hide:
            del sys.modules["ssl"]
    return asyncio


asyncio = _asyncio_without_tls()

from agent import config as config_mod  # noqa: E402
from agent import linux  # noqa: E402
from agent import log as log_mod  # noqa: E402
from agent.bootpolicy import BootPolicy  # noqa: E402
from agent.runtime.spawner import start_spawner  # noqa: E402


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
    boot_policy = BootPolicy(cfg.policy_file)  # parsed once, by the first that needs it
    if pid1:
        from agent import init

        init.pid1_setup(cfg.cmdline, cfg, boot_policy)
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
        return asyncio.run(wiring.run(cfg, spawner, boot_policy))
    finally:
        if log_port is not None:
            log_port.close()  # what is buffered goes to a connected host first
        if pid1:
            from agent import init

            init.poweroff()


if __name__ == "__main__":
    sys.exit(main())
