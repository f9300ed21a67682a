"""What an idle agent has imported: nothing that only some RPCs need (grpcio, pyroute2,
prometheus-client, the OCI conversion, OpenSSL, the network domain, the policy engine, the eBPF
device filter, argparse when there are no flags, the netlink thread's executor), because each costs RSS and a share of a TCG
guest's boot."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT

IDLE = """
import sys
import agent.__main__  # first, as in ``python -m agent``
import asyncio
from agent import config, wiring
from agent.metrics import Metrics
from agent.netlink import Netlink
config.load([])
from agent.bootpolicy import BootPolicy
assert wiring.boot_policy(BootPolicy('')) is None
wiring.all_handlers()
m = Metrics()  # as wiring.build makes them
m.observe_rpc("ListRoutes", "OK", 0.002)
async def netlink():
    Netlink()
asyncio.run(netlink())
print(" ".join(sorted(sys.modules)))
"""


ON_FIRST_USE = ("grpc", "pyroute2", "prometheus_client", "agent.oci", "ssl", "agent.network", "agent.policy",
                "agent.rego", "agent.runtime.cgroups.devices_bpf", "argparse", "concurrent.futures.thread")


def test_idle_agent_imports_nothing_that_waits_for_first_use():
    out = subprocess.run([sys.executable, "-c", IDLE], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = out.stdout.split()
    assert "agent.wiring" in modules
    loaded = sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in ON_FIRST_USE))
    assert not loaded, loaded


def test_first_scrape_and_first_netlink_step_import_them():
    code = ("import asyncio, sys\nfrom agent.metrics import Metrics\nfrom agent.netlink import Netlink\n"
            "Metrics().text()\n"
            "async def main():\n    nl = Netlink()\n    await nl.run(lambda ipr: None)\n    await nl.close()\n"
            "asyncio.run(main())\nprint('prometheus_client' in sys.modules, 'pyroute2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
