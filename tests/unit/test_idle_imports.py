"""What an idle agent has imported: nothing that only some RPCs need (grpcio, pyroute2,
prometheus-client), because each costs megabytes of RSS and a second of a TCG guest's boot."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT

IDLE = """
import asyncio, sys
import agent.__main__
from agent import wiring
from agent.metrics import Metrics
from agent.network import Netlink
wiring.all_handlers()
m = Metrics()  # as wiring.build makes them
m.observe_rpc("ListRoutes", "OK", 0.002)
async def netlink():
    Netlink()
asyncio.run(netlink())
print(" ".join(sorted(sys.modules)))
"""


def test_idle_agent_imports_no_grpcio_pyroute2_or_prometheus():
    out = subprocess.run([sys.executable, "-c", IDLE], cwd=ROOT, capture_output=True, text=True, check=True)
    top = {name.split(".")[0] for name in out.stdout.split()}
    assert "agent" in top
    assert not top & {"grpc", "pyroute2", "prometheus_client"}, sorted(top & {"grpc", "pyroute2", "prometheus_client"})


def test_first_scrape_and_first_netlink_step_import_them():
    code = ("import asyncio, sys\nfrom agent.metrics import Metrics\nfrom agent.network import Netlink\n"
            "Metrics().text()\n"
            "async def main():\n    nl = Netlink()\n    await nl.run(lambda ipr: None)\n    await nl.close()\n"
            "asyncio.run(main())\nprint('prometheus_client' in sys.modules, 'pyroute2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
