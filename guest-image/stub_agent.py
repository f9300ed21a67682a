"""A stand-in agent for testing the guest image before/without the real one: PID-1 set-up, then
grpc.health.v1 + Kata's grpc.Health on the agent.server_addr addresses (default tcp 1024 and
vsock 1024). Selected by /init when agent/__main__.py is absent or `agent.stub` is on the cmdline.
"""
import os
import sys
import time


def main(cmdline: dict) -> None:
    import agent.init as pid1

    t0 = time.monotonic()
    if os.getpid() == 1:
        pid1.pid1_setup(cmdline)
    t1 = time.monotonic()
    import grpc
    from concurrent import futures
    from grpc_health.v1 import health, health_pb2 as std_pb2, health_pb2_grpc as std_grpc
    from agent.protocols import health_pb2, health_pb2_grpc

    t2 = time.monotonic()
    from agent import boottrace

    boottrace.mark("stub-imported")

    class KataHealth(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

        def Version(self, request, context):
            return health_pb2.VersionCheckResponse(grpc_version="stub", agent_version="stub")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    std = health.HealthServicer()
    std.set("", std_pb2.HealthCheckResponse.SERVING)
    std_grpc.add_HealthServicer_to_server(std, server)
    health_pb2_grpc.add_HealthServicer_to_server(KataHealth(), server)
    addrs = cmdline.get("agent.server_addr", "tcp://0.0.0.0:1024,vsock://-1:1024").split(",")
    for a in addrs:
        target = a.replace("tcp://", "").replace("vsock://", "vsock:")
        try:
            server.add_insecure_port(target)
        except Exception as e:  # noqa: BLE001 - vsock may be missing
            print(f"stub-agent: cannot listen on {a}: {e}", file=sys.stderr, flush=True)
    server.start()
    boottrace.mark("stub-serving")
    print(f"stub-agent: serving {addrs} (setup {t1 - t0:.3f}s, import grpc {t2 - t1:.3f}s)",
          file=sys.stderr, flush=True)
    while True:
        if os.getpid() == 1:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
        time.sleep(1)
