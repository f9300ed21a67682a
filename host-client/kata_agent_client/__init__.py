"""Host-side client for the Kata-style guest agent: connect over tcp://, unix:// or vsock://."""

from kata_agent_client.client import AgentClient, connect  # noqa: F401
