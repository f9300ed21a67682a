"""agent.oci: the conversion names the field it cannot honour; it computes flags, caps and rlimits."""

from __future__ import annotations

import pytest

from agent import linux, oci
from agent.errors import InvalidArgument
from kata_agent_client.spec import default_config, spec_from_config


def spec(**changes):
    cfg = default_config(["sh"], rootfs="/r")
    for path, value in changes.items():
        target = cfg
        keys = path.split(".")
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return spec_from_config(cfg)


def test_default_spec_is_valid_and_converts():
    cfg = oci.convert(spec(), "c1").container
    assert cfg.rootfs == "/r" and cfg.readonly_root and cfg.hostname == "container"
    assert cfg.process.caps["bounding"] == (1 << 5) | (1 << 10) | (1 << 29)
    assert cfg.process.rlimits == [(7, 1024, 1024)]
    assert cfg.process.no_new_privileges
    assert (linux.CLONE_NEWPID, "") in cfg.namespaces and cfg.new_namespace(linux.CLONE_NEWNS)
    assert cfg.default_devices


@pytest.mark.parametrize("change, message", [
    ({"process.args": []}, "OCI.Process.Args: empty"),
    ({"mounts.3.destination": "dev/shm"}, "OCI.Mounts[3].destination: 'dev/shm' not absolute"),
    ({"mounts.0.destination": "/proc/../x"}, "OCI.Mounts[0].destination"),
    ({"root.path": "rootfs"}, "OCI.Root.Path: 'rootfs' not absolute"),
    ({"process.cwd": "tmp"}, "OCI.Process.Cwd"),
    ({"process.env": ["NOEQUALS"]}, "OCI.Process.Env[0]"),
    ({"process.rlimits": [{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]}, "OCI.Process.Rlimits[0].Type"),
    ({"process.rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]}, "OCI.Process.Rlimits[0]"),
    ({"process.capabilities": {"bounding": ["CAP_FLY"]}}, "OCI.Process.Capabilities.Bounding[0]"),
    ({"linux.namespaces": [{"type": "pid"}, {"type": "bogus"}]}, "OCI.Linux.Namespaces[1].Type"),
    ({"linux.namespaces": [{"type": "user"}, {"type": "uts"}]}, "OCI.Linux.UIDMappings: empty"),
    ({"linux.namespaces": [{"type": "pid"}, {"type": "mount"}]}, "OCI.Hostname"),
    ({"linux.rootfsPropagation": "sideways"}, "OCI.Linux.RootfsPropagation"),
    ({"linux.devices": [{"path": "/dev/x", "type": "q"}]}, "OCI.Linux.Devices[0].Type"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_BOGUS"}}, "OCI.Linux.Seccomp.DefaultAction"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_NOTIFY"}}, "SCMP_ACT_NOTIFY"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}},
     "OCI.Linux.Seccomp.Architectures[0]"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_BOGUS"]}},
     "OCI.Linux.Seccomp.Flags[0]"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}]}},
     "OCI.Linux.Seccomp.Syscalls[0].Names: empty"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["Mk/dir"], "action": "SCMP_ACT_ERRNO"}]}},
     "OCI.Linux.Seccomp.Syscalls[0].Names[0]"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOPE"}]}},
     "OCI.Linux.Seccomp.Syscalls[0].Action"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "op": "SCMP_CMP_EQ"}]}]}},
     "OCI.Linux.Seccomp.Syscalls[0].Args[0].Index"),
    ({"linux.seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 1, "op": "SCMP_CMP_ABOUT"}]}]}},
     "OCI.Linux.Seccomp.Syscalls[0].Args[0].Op"),
    ({"hooks": {"startContainer": [{"path": "/bin/true"}]}}, "OCI.Hooks.StartContainer"),
    ({"hooks": {"prestart": [{"path": "true"}]}}, "OCI.Hooks.Prestart[0].Path"),
    ({"linux.maskedPaths": ["proc/kcore"]}, "OCI.Linux.MaskedPaths[0]"),
])
def test_conversion_names_the_field(change, message):
    with pytest.raises(InvalidArgument) as e:
        oci.convert(spec(**change), "c")
    assert message in e.value.message


def test_missing_process_and_root():
    with pytest.raises(InvalidArgument, match="OCI.Process: missing"):
        oci.convert(spec_from_config({"root": {"path": "/r"}}), "c")
    with pytest.raises(InvalidArgument, match="OCI.Root.Path: empty"):
        oci.convert(spec_from_config({"process": {"args": ["sh"]}}), "c")


def test_mount_options():
    m = oci.convert_mount(spec_from_config({"mounts": [{"destination": "/a/", "type": "tmpfs", "source": "t",
                                                         "options": ["nosuid", "ro", "rw", "mode=755", "size=1m",
                                                                     "rslave", "tmpcopyup"]}]}).Mounts[0])
    assert m.destination == "/a"
    assert m.flags == linux.MS_NOSUID
    assert m.data == "mode=755,size=1m"
    assert m.propagation == [linux.MS_SLAVE | linux.MS_REC]
    b = oci.convert_mount(spec_from_config({"mounts": [{"destination": "/b", "type": "bind", "source": "/s",
                                                         "options": ["rbind", "ro"]}]}).Mounts[0])
    assert b.is_bind and b.flags == linux.MS_BIND | linux.MS_REC | linux.MS_RDONLY


def test_dev_bind_disables_default_devices():
    s = spec(**{"mounts.1": {"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind"]}})
    assert not oci.convert(s, "c").container.default_devices


def test_devices_and_string_user():
    s = spec(**{"linux.devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o600}]})
    d = oci.convert(s, "c").container.devices[0]
    assert (d.path, d.mode, d.major, d.minor) == ("/dev/fuse", 0o020600, 10, 229)
    from agent.protocols import agent_pb2

    assert oci.string_user(agent_pb2.StringUser(uid="user", gid="extra")) == "user:extra"
    assert oci.string_user(agent_pb2.StringUser()) == ""
    assert oci.convert(spec(), "c", "user").container.process.user == "user"


def test_unlimited_rlimit():
    s = spec(**{"process.rlimits": [{"type": "RLIMIT_CORE", "hard": 2**64 - 1, "soft": 2**64 - 1}]})
    import resource

    assert oci.convert(s, "c").container.process.rlimits == [(4, resource.RLIM_INFINITY, resource.RLIM_INFINITY)]


def test_seccomp_conversion():
    s = spec(**{"linux.seccomp": {
        "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                      "args": [{"index": 1, "value": 448, "op": "SCMP_CMP_EQ"}]},
                     {"names": ["chmod"], "action": "SCMP_ACT_ERRNO"},
                     {"names": ["reboot"], "action": "SCMP_ACT_KILL_PROCESS"}]}})
    cfg = oci.convert(s, "c1").container.seccomp
    assert cfg.default_action == 0x7FFF0000
    assert cfg.architectures == ["x86_64", "aarch64"] and cfg.flags == [6]
    assert cfg.syscalls[0].names == ["mkdir", "mkdirat"]
    assert cfg.syscalls[0].action == 0x00050000 | 13
    assert cfg.syscalls[0].args == [(1, 4, 448, 0)]
    assert cfg.syscalls[1].action == 0x00050000 | 1  # errnoRet unset: EPERM, as runc
    assert cfg.syscalls[2].action == 0x80000000
    assert oci.convert(spec(), "c1").container.seccomp is None



def test_hooks_and_resources_are_converted_and_owned():
    s = spec(**{"hooks": {"prestart": [{"path": "/bin/h", "args": ["h", "x"], "timeout": 5}]},
                "linux.resources": {"devices": [{"allow": False, "access": "rwm"}]},
                "linux.devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                                  {"path": "/dev/p", "type": "p"}]})
    cfg = oci.convert(s, "c")
    assert [(h.path, h.args, h.timeout) for h in cfg.hooks.prestart] == [("/bin/h", ["h", "x"], 5.0)]
    assert not cfg.hooks.poststop
    oci.allow_devices(cfg)  # runc's rule per device (a fifo has none), and the spec is untouched
    assert [(r.Allow, r.Type, r.Major, r.Minor) for r in cfg.resources.Devices] == [
        (False, "", 0, 0), (True, "c", 10, 229)]
    assert len(s.Linux.Resources.Devices) == 1


def test_a_hot_plugged_device_takes_the_guest_numbers_in_the_config_and_its_cgroup_rules():
    from agent import devices

    s = spec(**{"linux.resources": {"devices": [{"allow": False, "access": "rwm"},
                                                {"allow": True, "type": "b", "major": 8, "minor": 0,
                                                 "access": "rw"}]},
                "linux.devices": [{"path": "/dev/vda", "type": "b", "major": 8, "minor": 0},
                                  {"path": "/dev/vdb", "type": "b", "major": 8, "minor": 0}]})
    cfg = oci.convert(s, "c")
    devices.use_node(cfg, "/dev/vda", devices.Node("/dev/vdx", 252, 16), "devices[0]")
    devices.use_node(cfg, "/dev//vdb", devices.Node("/dev/vdy", 252, 32), "devices[1]")
    oci.allow_devices(cfg)
    assert [(d.path, d.major, d.minor) for d in cfg.container.devices] == [("/dev/vda", 252, 16),
                                                                         ("/dev/vdb", 252, 32)]
    # bound from the guest's node where it cannot be made (a user namespace)
    assert [d.source for d in cfg.container.devices] == ["/dev/vdx", "/dev/vdy"]
    assert [(r.Type, r.Major, r.Minor, r.Access) for r in cfg.resources.Devices] == [
        ("", 0, 0, "rwm"), ("b", 252, 16, "rw"), ("b", 252, 16, "rwm"), ("b", 252, 32, "rwm")]
    with pytest.raises(InvalidArgument, match=r"devices\[2\].container_path: no OCI.Linux.Devices entry"):
        devices.use_node(cfg, "/dev/vdz", devices.Node("/dev/vdz", 1, 1), "devices[2]")


# --- user namespaces --------------------------------------------------------------------------

def userns(uid_maps=None, gid_maps=None, path=""):
    one = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    ns = {"type": "user", "path": path} if path else {"type": "user"}
    return spec(**{"linux.namespaces": default_config()["linux"]["namespaces"] + [ns],
                   "linux.uidMappings": one if uid_maps is None else uid_maps,
                   "linux.gidMappings": one if gid_maps is None else gid_maps})


def test_a_new_user_namespace_converts_with_its_maps():
    cfg = oci.convert(userns(), "c").container
    assert cfg.uid_mappings == cfg.gid_mappings == [(0, 100000, 65536)]
    assert cfg.new_namespace(linux.CLONE_NEWUSER)
    assert cfg.host_ids() == (100000, 100000) and cfg.host_ids(1000, 5) == (101000, 100005)
    assert cfg.host_ids(70000) is None


@pytest.mark.parametrize("uid_maps, message", [
    ([], "OCI.Linux.UIDMappings: empty, but the container has a new user namespace"),
    ([{"containerID": 0, "hostID": 1, "size": 0}], "OCI.Linux.UIDMappings[0].Size: 0"),
    ([{"containerID": 1, "hostID": 100000, "size": 10}], "the container's root (id 0) is not mapped"),
    ([{"containerID": 0, "hostID": 4294967295, "size": 2}], "OCI.Linux.UIDMappings[0].HostID: 4294967295 + size 2 is past 2^32"),
    ([{"containerID": 4294967290, "hostID": 0, "size": 7}, {"containerID": 0, "hostID": 10, "size": 1}],
     "OCI.Linux.UIDMappings[0].ContainerID"),
    ([{"containerID": 0, "hostID": 100000, "size": 10}, {"containerID": 5, "hostID": 200000, "size": 10}],
     "OCI.Linux.UIDMappings[1].ContainerID: overlaps"),
    ([{"containerID": 0, "hostID": 100000, "size": 10}, {"containerID": 50, "hostID": 100005, "size": 10}],
     "OCI.Linux.UIDMappings[1].HostID: overlaps"),
    ([{"containerID": i, "hostID": 100000 + i, "size": 1} for i in range(341)], "341 extents, the kernel takes at most 340"),
    ([{"containerID": i * 10, "hostID": 4000000000 + i * 10, "size": 1} for i in range(300)],
     "longer than the kernel takes in one write"),
])
def test_bad_uid_maps_are_named(uid_maps, message):
    with pytest.raises(InvalidArgument) as e:
        oci.convert(userns(uid_maps=uid_maps), "c")
    assert message in e.value.message


def test_gid_maps_are_checked_too():
    with pytest.raises(InvalidArgument) as e:
        oci.convert(userns(gid_maps=[]), "c")
    assert e.value.message.startswith("OCI.Linux.GIDMappings: empty")


def test_maps_without_a_user_namespace_are_refused():
    with pytest.raises(InvalidArgument) as e:
        oci.convert(spec(**{"linux.uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]}), "c")
    assert "OCI.Linux.UIDMappings: set, but the container has no user namespace" in e.value.message


def test_a_user_namespace_by_path_needs_no_maps():
    cfg = oci.convert(userns(uid_maps=[], gid_maps=[], path="/proc/1/ns/user"), "c").container
    assert (linux.CLONE_NEWUSER, "/proc/1/ns/user") in cfg.namespaces and cfg.uid_mappings == []
    assert cfg.host_ids() is None


def test_devpts_gid_stays_only_when_mapped():
    pts = lambda c: next(m for m in c.mounts if m.type == "devpts").data  # noqa: E731
    assert "gid=5" in pts(oci.convert(userns(), "c").container)
    small = [{"containerID": 0, "hostID": 100000, "size": 1}]
    data = pts(oci.convert(userns(gid_maps=small), "c").container)
    assert "gid=" not in data and "ptmxmode=0666" in data
    assert "gid=5" in pts(oci.convert(spec(), "c").container)  # no user namespace: untouched


def test_map_text_is_what_the_kernel_reads():
    assert oci.map_text([(0, 100000, 65536), (65536, 1, 1)]) == "0 100000 65536\n65536 1 1\n"


def test_the_process_ids_must_be_mapped_in_a_new_user_namespace():
    small = [{"containerID": 0, "hostID": 100000, "size": 1000}]
    for user, message in (({"uid": 1000, "gid": 0}, "OCI.Process.User.UID: 1000 is not mapped"),
                          ({"uid": 0, "gid": 5000}, "OCI.Process.User.GID: 5000 is not mapped"),
                          ({"uid": 0, "gid": 0, "additionalGids": [1, 1001]},
                           "OCI.Process.User.AdditionalGids[1]: 1001 is not mapped")):
        s = userns(uid_maps=small, gid_maps=small)
        s.Process.User.CopyFrom(spec(**{"process.user": user}).Process.User)
        with pytest.raises(InvalidArgument) as e:
            oci.convert(s, "c")
        assert e.value.message.startswith(message)
    s = userns(uid_maps=small, gid_maps=small)
    s.Process.User.CopyFrom(spec(**{"process.user": {"uid": 1000, "gid": 1000}}).Process.User)
    assert oci.convert(s, "c", string_user="user").container.process.user == "user"  # resolved inside
