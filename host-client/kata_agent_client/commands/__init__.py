"""Sub-commands of kata-agent-ctl, one module per area (see kata_agent_client.cli)."""
