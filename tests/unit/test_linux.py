"""agent.linux's parsers of kernel text: mountinfo, the kernel command line, mount(8) options."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from agent import linux


def _escape(path: bytes) -> bytes:
    """As the kernel writes a path into mountinfo (fs/proc_namespace.c: space, tab, newline and
    backslash as three octal digits)."""
    return b"".join(b"\\%03o" % c if c in b" \t\n\\" else bytes([c]) for c in path)


def test_mountinfo_non_ascii_mount_point_with_an_escaped_space(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_bytes("36 22 8:16 / /mnt/é\\040x rw,nosuid shared:1 - ext4 /dev/vdb rw,errors=remount-ro\n"
                     .encode())
    [m] = linux.mountinfo(str(info))
    assert m.mount_point == "/mnt/é x"
    assert (m.mount_id, m.parent_id, m.root, m.options) == (36, 22, "/", "rw,nosuid")
    assert (m.fstype, m.source, m.super_options) == ("ext4", "/dev/vdb", "rw,errors=remount-ro")


def test_mountinfo_unescapes_every_path_field_and_skips_malformed_lines():
    text = (b"1 0 0:1 /a\\011b /c\\012d rw - tmpfs my\\134src rw\n"
            b"not a mountinfo line\n"
            b"2 1 0:2 / /e rw - proc none\n")  # no super options: still a mount
    first, second = linux.parse_mountinfo(text)
    assert (first.root, first.mount_point, first.source) == ("/a\tb", "/c\nd", "my\\src")
    assert (second.mount_point, second.fstype, second.source, second.super_options) == ("/e", "proc", "none", "")


def test_mounts_under_a_directory_whole_components_deepest_first(tmp_path):
    """The one reader of "what is mounted below here", for the agent's storages and the shim."""
    info = tmp_path / "mountinfo"
    info.write_text("".join(f"{i} 1 0:{i} / {p} rw - tmpfs t rw\n" for i, p in enumerate(
        ["/", "/run/k", "/run/k/a", "/run/kx", "/run/k/a/b", "/other", "/run/k/c"], start=2)))
    assert linux.mounts_under("/run/k", str(info)) == ["/run/k/c", "/run/k/a/b", "/run/k/a", "/run/k"]
    assert linux.mounts_under(tmp_path / "nothing", str(info)) == []
    assert linux.mounts_under("/run/k/", str(info)) == linux.mounts_under("/run/k", str(info))


def test_mountinfo_keeps_bytes_that_are_not_utf8_as_os_does():
    [m] = linux.parse_mountinfo(b"1 0 0:1 / /mnt/\xff\\040x rw - tmpfs t rw\n")
    assert os.fsencode(m.mount_point) == b"/mnt/\xff x"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1))
def test_mountinfo_reads_back_any_path_the_kernel_escapes(name):
    raw = b"/" + name.encode()
    [m] = linux.parse_mountinfo(b"7 1 0:9 / " + _escape(raw) + b" rw - tmpfs tmpfs rw\n")
    assert m.mount_point == "/" + name


def test_mountinfo_of_this_process_has_the_root():
    assert any(m.mount_point == "/" for m in linux.mountinfo())


def test_cmdline_quoted_values_as_the_kernel_reads_them():
    text = ('console=ttyS0 agent.policy="/run/my policy.json" "agent.log=debug x" quiet '
            'k=a"b c"d agent.ip=10.0.0.2/24 agent.ip=10.0.0.3/24 -- init=arg\n')
    assert linux.parse_cmdline(text) == {
        "console": "ttyS0",
        "agent.policy": "/run/my policy.json",  # quotes around a value go
        "agent.log": "debug x",  # and around the whole word
        "quiet": "",  # a bare key
        "k": 'a"b c"d',  # a quote inside a value stays, as the kernel keeps it
        "agent.ip": "10.0.0.3/24",  # a later key wins
    }  # "--": what follows is init's


def test_cmdline_edge_cases():
    assert linux.parse_cmdline("") == {}
    assert linux.parse_cmdline("  \t\n") == {}
    assert linux.parse_cmdline("a= b") == {"a": "", "b": ""}
    assert linux.parse_cmdline('a="" b') == {"a": "", "b": ""}
    assert linux.parse_cmdline('a="open to the end') == {"a": "open to the end"}
    assert linux.parse_cmdline("a=b=c") == {"a": "b=c"}


def test_read_cmdline(tmp_path):
    path = tmp_path / "cmdline"
    path.write_text('agent.policy="/a b" ro\n')
    assert linux.read_cmdline(str(path)) == {"agent.policy": "/a b", "ro": ""}
    assert linux.read_cmdline(str(tmp_path / "missing")) == {}


def test_mount_options_sorted_out():
    words = linux.parse_mount_options(["nosuid", "ro", "rw", "mode=755,size=1m", "rslave",
                                       "nodev,lazytime", "private", "defaults", ""])
    assert words.flags == linux.MS_NOSUID | linux.MS_NODEV | linux.MS_LAZYTIME  # rw undid ro
    assert words.propagation == (linux.MS_SLAVE | linux.MS_REC, linux.MS_PRIVATE)
    assert words.data == ("mode=755", "size=1m")


def test_one_mount_option_table_for_oci_and_storages():
    from agent.oci import convert_mount
    from agent.protocols import oci_pb2
    from agent.storage.syscalls import parse_options

    options = ["rbind", "ro", "nosymfollow", "rshared", "size=1m"]
    oci = convert_mount(oci_pb2.Mount(destination="/d", source="/s", type="bind", options=options))
    storage = parse_options(options)
    assert oci.flags == storage.flags & ~linux.MS_PROPAGATION
    assert oci.propagation == [storage.propagation | linux.MS_REC]
    assert oci.data == storage.data == "size=1m"


def test_the_spawner_side_stays_small():
    """The spawner imports agent.linux and agent.runtime.child's roles; what they load, every fork of the
    spawner copies (dataclasses alone brings inspect: 14 modules, 1.5 MB)."""
    import subprocess
    import sys

    code = ("import sys; import agent.linux, agent.runtime.child.intermediate, agent.runtime.spawner; "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                                check=True, cwd=os.path.dirname(os.path.dirname(linux.__file__))).stdout.split())
    assert not loaded & {"dataclasses", "inspect", "grpc", "google.protobuf", "asyncio"}, loaded
