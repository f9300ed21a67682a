"""containerd-shim-kata-py-v2: a containerd runtime v2 shim that runs each task in a QEMU guest.

containerd (1.6) starts ``containerd-shim-kata-py-v2 -namespace NS -address SOCK -publish-binary
BIN -id ID start`` in the task's bundle directory for the runtime ``io.containerd.kata-py.v2``.
``start`` binds a unix socket, starts the serving shim in a session of its own with that socket,
writes the bundle's ``address`` file and prints the address; containerd then speaks ttrpc to it
(``containerd.task.v2.Task``, agent.ttrpc on both sides). After the task is deleted containerd
calls Shutdown and the shim exits. If the shim died, containerd runs ``... -bundle DIR delete``,
which removes what the dead shim left (QEMU, virtiofsd, mounts, its socket and run directory) and
prints a DeleteResponse.

The task's VM starts from a template (qemu.template: ~0.6 s against ~9 s cold under TCG, made on
first use), gets virtio-fs hot-plugged on a directory holding the container's rootfs, which the
shim mounts from containerd's mounts (overlay snapshots) on the host: nothing is copied. Then
CreateSandbox (that directory as a virtio-fs storage under /run/kata-containers/shared) and
CreateContainer. containerd's stdio FIFOs are pumped to WriteStdin and from ReadStdout/ReadStderr;
a process's exit is reported once its output has been written out.

Modules: ``cli`` (start, delete, serve), ``sandbox`` (paths, mounts, the VM and its clean-up),
``task`` (the Task service), ``events`` (publishing to containerd's TTRPC_ADDRESS), ``stdio``.
"""

RUNTIME = "io.containerd.kata-py.v2"
BINARY = "containerd-shim-kata-py-v2"
VERSION = "0.1.0"
TASK_SERVICE = "containerd.task.v2.Task"
