"""kata-agent-ctl ip / route / guest-details / metrics / set-policy against an agent in a test netns."""

from __future__ import annotations

import json

from kata_agent_client import cli


def ctl(agent, capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["--addr", agent.addr, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_ip_and_route_commands(netns, netns_agent, capsys, tmp_path):
    netns.ip("link", "add", "v0", "address", "02:00:00:cc:00:01", "type", "veth", "peer", "name", "v1")
    rc, out, _ = ctl(netns_agent, capsys, "ip", "update", "--hwaddr", "02:00:00:cc:00:01", "--name", "eth0",
                     "--mtu", "1300", "--address", "10.7.0.2/24")
    assert rc == 0 and out.split()[:4] == ["eth0", "02:00:00:cc:00:01", "mtu", "1300"] and "10.7.0.2/24" in out
    rc, out, _ = ctl(netns_agent, capsys, "ip", "list")
    assert rc == 0 and {line.split()[0] for line in out.splitlines()} == {"lo", "eth0", "v1"}
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps([{"gateway": "10.7.0.1", "device": "eth0"},
                                  {"dest": "10.7.0.0/24", "device": "eth0", "source": "10.7.0.2"}]))
    rc, out, _ = ctl(netns_agent, capsys, "route", "update", str(routes))
    assert rc == 0 and "default via 10.7.0.1 dev eth0" in out
    rc, out, _ = ctl(netns_agent, capsys, "route", "list", "--json")
    assert {r.get("dest", "") for r in json.loads(out)["Routes"] if r.get("family", "v4") == "v4"} == {"", "10.7.0.0/24"}
    rc, _, err = ctl(netns_agent, capsys, "ip", "update", "--hwaddr", "02:00:00:cc:00:99")
    assert rc == 1 and "NOT_FOUND" in err and "02:00:00:cc:00:99" in err


def test_guest_metrics_and_policy_commands(netns_agent, capsys, tmp_path):
    rc, out, _ = ctl(netns_agent, capsys, "guest-details")
    assert rc == 0 and json.loads(out)["agent_details"]["version"]
    rc, out, _ = ctl(netns_agent, capsys, "metrics")
    assert rc == 0 and 'kata_agent_rpc_requests_total{code="OK",method="GetGuestDetails"} 1.0' in out
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"rules": [{"name": "no-metrics", "method": "GetMetrics", "action": "deny"}]}))
    assert ctl(netns_agent, capsys, "set-policy", str(policy))[0] == 0
    rc, _, err = ctl(netns_agent, capsys, "metrics")
    assert rc == 1 and "PERMISSION_DENIED" in err and "no-metrics" in err
    policy.write_text("{not json")
    rc, _, err = ctl(netns_agent, capsys, "set-policy", str(policy))
    assert rc == 1 and "not JSON" in err
