"""fs_group: hand a volume to a group, as Kubernetes' fsGroup does.

Every file gets the group and group read/write (and group execute where the owner has it);
directories get set-group-id so new files inherit the group. ``OnRootMismatch`` skips the walk
when the volume's root already has the group. The walk never leaves the volume's filesystem and
never follows symlinks.
"""

from __future__ import annotations

import os
import stat

POLICY_ALWAYS = 0
POLICY_ON_ROOT_MISMATCH = 1


def _fix(path: str, st: os.stat_result, gid: int) -> None:
    os.lchown(path, -1, gid)
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode) | stat.S_IRGRP | stat.S_IWGRP
    if st.st_mode & stat.S_IXUSR:
        mode |= stat.S_IXGRP
    if stat.S_ISDIR(st.st_mode):
        mode |= stat.S_ISGID | stat.S_IXGRP
    os.chmod(path, mode)


def apply_fs_group(root: str, gid: int, policy: int = POLICY_ALWAYS) -> int:
    """Apply ``gid`` below ``root``; returns the number of entries changed."""
    top = os.lstat(root)
    if policy == POLICY_ON_ROOT_MISMATCH and top.st_gid == gid:
        return 0
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if os.lstat(os.path.join(dirpath, name)).st_dev != top.st_dev:
                dirnames.remove(name)  # a mount below: not ours to change
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            _fix(path, os.lstat(path), gid)
            changed += 1
    _fix(root, top, gid)
    return changed + 1
