"""GetMetrics over gRPC: Prometheus text with the agent's RPC counts and the guest's figures."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def test_get_metrics_counts_rpcs_and_reports_guest(agent):
    agent.client.call("GetGuestDetails", {})
    agent.client.call("GetGuestDetails", {})
    text = agent.client.call("GetMetrics", {}).metrics
    families = {f.name: f for f in text_string_to_metric_families(text)}
    count = {tuple(sorted(s.labels.items())): s.value for s in families["kata_agent_rpc_requests"].samples
             if s.name.endswith("_total")}
    assert count[(("code", "OK"), ("method", "GetGuestDetails"))] == 2
    assert families["kata_agent_process_resident_memory_bytes"].samples[0].value > 1 << 20
    assert families["kata_agent_process_open_fds"].samples[0].value > 3
    assert families["kata_agent_containers"].samples[0].value == 0
    assert {s.labels["period"] for s in families["kata_guest_load"].samples} == {"1m", "5m", "15m"}
    assert any(s.labels["kind"] == "MemTotal" and s.value > 0 for s in families["kata_guest_memory_bytes"].samples)
    assert families["kata_guest_cpus_online"].samples[0].value >= 1
    assert "kata_guest_network_receive_bytes" in families
