"""The boot policy (``--policy-file`` / ``agent.policy=``), read and parsed at most once.

PID 1's set-up asks it whether the debug console may start (agent.init), then the wiring makes it
the agent's policy (agent.wiring): one document, one parse. Light to import: agent.policy (and
protobuf, or the Rego engine) is loaded only when there is a policy to parse.
"""

from __future__ import annotations

from typing import Any

from agent.errors import AgentError


class BootPolicy:
    def __init__(self, value: str) -> None:
        self.value = value  # a path, or the document in base64; "" for none
        self.source = ""
        self._policy: Any = None
        self._error: Exception | None = None
        self._loaded = False

    def get(self) -> Any:
        """The parsed policy (agent.policy.Policy or agent.rego.RegoPolicy); None when none was
        given. When it cannot be used, raises why, every time it is asked: OSError, PolicyError,
        or FAILED_PRECONDITION where this guest has no Rego engine."""
        if not self.value:
            return None
        if not self._loaded:
            from agent import policy

            try:
                text, self.source = policy.load_source(self.value)
                self._policy = policy.parse(text, self.source)
            except (OSError, AgentError) as exc:
                self._error = exc
            self._loaded = True
        if self._error is not None:
            raise self._error
        return self._policy
