"""Host-side client for the Kata-style guest agent: connect over vsock://, serial://, tcp:// or unix://."""


def __getattr__(name: str):
    # lazily, so that ``kata_agent_client.dial`` can be used without importing grpcio
    if name in ("AgentClient", "connect"):
        from kata_agent_client import client

        return getattr(client, name)
    raise AttributeError(name)
