"""A Kata-style guest agent: gRPC server for the Kata agent protocol and an OCI container runtime."""

__version__ = "0.1.0"
# The Kata agent protocol revision this agent is wire-compatible with (tests/data/kata-wire-contract.json).
PROTOCOL_VERSION = "kata-agent-protocol 2026-08"
