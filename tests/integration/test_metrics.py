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


def test_undecodable_body_is_counted(agent):
    """A body that does not parse is answered INVALID_ARGUMENT before any handler; it is still
    counted, with its method and code, as every other call."""
    import grpc

    with grpc.insecure_channel(agent.addr.removeprefix("tcp://")) as ch:
        call = ch.unary_unary("/grpc.AgentService/CreateContainer")
        for _ in range(2):
            try:
                call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            else:
                raise AssertionError("an undecodable body was accepted")
    text = agent.client.call("GetMetrics", {}).metrics
    families = {f.name: f for f in text_string_to_metric_families(text)}
    count = {tuple(sorted(s.labels.items())): s.value for s in families["kata_agent_rpc_requests"].samples
             if s.name.endswith("_total")}
    assert count[(("code", "INVALID_ARGUMENT"), ("method", "CreateContainer"))] == 2
