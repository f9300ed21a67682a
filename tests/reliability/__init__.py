"""Reliability harness: an isolated agent, invariant snapshots and protobuf fuzz strategies."""
