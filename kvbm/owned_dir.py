"""A directory this node's user owns and nobody else can write into: where
a node's socket and its own secret live (the configured socket's directory,
or the private node's).

In a shared /tmp another user could otherwise make the directory first and
swap the socket for one of their own (the engines would attach to a fake
node), or plant a link that a chmod after `bind` follows. A directory that
another user owns, or that its group or others may write into, is refused;
one of ours is set to its mode (0700, or 0750 to `shared_group`) through its
descriptor, never through a path that could be swapped meanwhile.
"""

from __future__ import annotations

import os
import stat

from kvbm.errors import KvbmError


def own_directory(path: str, gid: int | None = None) -> None:
    """Make `path` (0700, or 0750 to group `gid`) or take it if it is ours."""
    os.close(open_own_directory(path, gid))


def open_own_directory(path: str, gid: int | None = None, parents: bool = False) -> int:
    """`own_directory`, kept open: its descriptor (the caller closes it),
    through which what is in it can be opened without a path that could be
    swapped. `parents`: make missing parents first (as the node's user)."""
    mode = 0o700 if gid is None else 0o750
    try:
        if parents:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as e:
        raise KvbmError(f"cannot make the directory {path}: {e}") from e
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:  # a link, or not a directory
        raise KvbmError(f"{path} is not a directory of this user ({e}): remove it") from e
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise KvbmError(
                f"{path} is not a private directory of this user (owner uid {st.st_uid}, "
                f"mode {stat.S_IMODE(st.st_mode):04o}): another user could swap what is "
                "in it; remove it, or choose another path"
            )
        if gid is not None and st.st_gid != gid:
            os.fchown(fd, -1, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
        return fd
    except BaseException:
        os.close(fd)
        raise
