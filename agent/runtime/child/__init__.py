"""Code that runs in the spawner's forked children, one module per process role:

* ``intermediate``: the child of a CreateContainer or ExecProcess request that joins namespaces
  and the cgroup, forks the container init or the exec'd process, reports its pid and exits (so
  that process is re-parented to the agent, a child subreaper or PID 1, and reaped there); also
  the double fork of a spawner task;
* ``container_init``: the container's init, set up in its namespaces and rootfs (``rootfs``),
  waiting for the start; either forked by the intermediate or, for a container in a new PID
  namespace, the spawner's PID 1 zygote itself;
* ``process``: what the init and an exec'd process do last: stdio, limits, user, capabilities,
  seccomp, exec.

They speak agent.runtime.protocol on their request's sync socket, and import only the standard
library, agent.linux and agent.runtime.seccomp (no grpc, no asyncio, no dataclasses: every fork of
the spawner copies what it loaded). ``common`` holds what the roles share.
"""
