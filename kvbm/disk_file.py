"""Opening the disk tier's file so that no other local user can have made it.

The file's name is predictable (its directory and the model's geometry), so
another user could otherwise make the directory first, or plant a file or a
link under that name for the node to adopt: then that user reads every block
and rewrites them. The directory must be the node user's own and closed to
writes by its group and others (a sticky /tmp-like directory is not: its
owner is root, and anyone may add names to it); the file is opened through
the directory's descriptor, never following a link, and must be the node
user's own regular file, closed to its group and others. Absent, it is made
0600 with O_EXCL, so a name planted meanwhile fails the open, never is used.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat

from kvbm.errors import DiskTierError, KvbmError
from kvbm.owned_dir import open_own_directory

log = logging.getLogger("kvbm.disk")

_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def open_disk_directory(directory: str) -> int:
    """The disk tier's directory, made 0700 if absent, as a descriptor; raises
    DiskTierError where it is not a private directory of this user."""
    try:
        fd = open_own_directory(directory, parents=True)
    except KvbmError as e:
        raise DiskTierError(f"disk_cache_dir: {e}") from e
    if not os.access(directory, os.W_OK | os.X_OK):
        os.close(fd)
        raise DiskTierError(f"disk_cache_dir {directory} is not writable")
    return fd


def open_disk_file(dir_fd: int, path: str, direct_io: bool) -> tuple[int, bool]:
    """(descriptor, whether O_DIRECT took) of the file `path`, opened by its
    name in the directory `dir_fd` (the path's directory, as checked);
    raises DiskTierError where it is not this user's own."""
    name = os.path.basename(path)
    use_direct = direct_io and hasattr(os, "O_DIRECT")
    while True:
        try:
            fd = _open(dir_fd, name, use_direct)
            break
        except OSError as e:
            if e.errno == errno.EINVAL and use_direct:
                log.info("file system refuses O_DIRECT; using the page cache path=%s", path)
                use_direct = False
                continue
            if e.errno == errno.ELOOP:
                raise DiskTierError(
                    f"{path} is a symbolic link; refusing it (another user may have planted "
                    "it): remove it"
                ) from e
            raise DiskTierError(f"cannot open disk arena {path}: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DiskTierError(f"{path} is not a regular file; refusing it: remove it")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise DiskTierError(
                f"{path} is not a private file of this user (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}); refusing it: another user could read or "
                "rewrite its blocks. Remove it (the node makes it anew)"
            )
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return fd, use_direct
    except BaseException:
        os.close(fd)
        raise


def reserve_file(fd: int, path: str, size: int, preallocate: bool) -> None:
    """Make the file `size` bytes, its blocks reserved unless `preallocate`
    is off (or the file system cannot): a full disk is found at the start."""
    os.ftruncate(fd, size)
    if not preallocate:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            log.info("file system cannot preallocate; the arena file is sparse path=%s", path)
            return
        os.ftruncate(fd, 0)
        if e.errno == errno.ENOSPC:
            free = os.statvfs(os.path.dirname(path))
            raise DiskTierError(
                f"no room for a {size >> 20} MiB disk arena at {path} "
                f"({free.f_bavail * free.f_frsize >> 20} MiB free): lower the disk cache size"
            ) from e
        raise DiskTierError(f"cannot preallocate {path}: {e}") from e


def _open(dir_fd: int, name: str, direct: bool) -> int:
    """Open the file if it is there, else make it; O_EXCL: never a name
    someone planted between the two."""
    flags = _FILE_FLAGS | (os.O_DIRECT if direct else 0)
    for _ in range(8):
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        try:
            return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue  # made meanwhile: opened (and checked) as one that was there
    raise OSError(errno.EAGAIN, "the file keeps appearing and disappearing")
