"""The container runtime: a libcontainer in Python (spawner, rootfs, processes, cgroups)."""
