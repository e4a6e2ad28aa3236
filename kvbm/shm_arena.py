"""A named shared-memory region (a file in a memory file system, /dev/shm by
default) that another process can map by name.

The node creates the arena; an engine process attaches to the same name and
copies blocks in and out of it directly. The region's pages are reserved at
creation (posix_fallocate), so a full file system is a clear error at start
rather than a SIGBUS in the middle of a copy. A directory on a tmpfs mounted
with `huge=always` gives the arena 2 MiB pages: the kernel's copy between two
processes (a peer's READ on one host) then runs 1.5-2 times as fast here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import stat

import numpy as np

from kvbm.errors import ArenaError

log = logging.getLogger("kvbm.arena")
SHM_DIR = "/dev/shm"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class SharedArena:
    """One mapping of a shared-memory region. `close()` is safe to call twice.

    The creator owns the name: it holds an exclusive flock on the file for as
    long as it lives and unlinks the name on close. A creator that dies without
    closing (SIGKILL, OOM) loses its lock with its life, so the next creator's
    `sweep_stale` finds the orphan and removes it. Attachers only map and unmap.
    """

    def __init__(
        self, name: str, directory: str, fd: int, size: int, owner: bool, writable: bool = True
    ) -> None:
        self.name = name
        self.directory = directory
        self.size = size
        self.owner = owner
        self._lock_fd = fd if owner else -1  # the owner's fd carries its flock
        try:
            st = os.fstat(fd)
            # how /proc/<pid>/smaps knows the file (by path it may show the name it was built under)
            self._smaps_id = (
                f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}",
                str(st.st_ino),
            )
            # MAP_POPULATE faults every page in now, not in the middle of a copy.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size, flags, prot)
        except BaseException:
            os.close(fd)
            raise
        if not owner:
            os.close(fd)
        self.array: np.ndarray = np.frombuffer(self._mmap, dtype=np.uint8)

    @staticmethod
    def path_of(name: str, directory: str = SHM_DIR) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"arena name must match {_NAME.pattern}, got {name!r}")
        return os.path.join(directory, name)

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        mode: int = 0o600,
        gid: int | None = None,
        directory: str = SHM_DIR,
    ) -> SharedArena:
        if size <= 0:
            raise ValueError(f"arena size must be positive, got {size}")
        path = cls.path_of(name, directory)
        # Build under a hidden name, locked, then link into place: a sweeper
        # never sees the final name without its owner's lock on it.
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.creating")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        except OSError as e:
            raise ArenaError(f"cannot create an arena in {directory}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, mode)  # umask must not narrow the mode we were asked for
            if gid is not None:
                os.fchown(fd, -1, gid)  # the group whose engines may map it
            os.posix_fallocate(fd, 0, size)
            os.link(tmp, path)
        except FileExistsError as e:
            os.close(fd)
            raise ArenaError(f"shared-memory arena {path} already exists") from e
        except OSError as e:
            os.close(fd)
            if e.errno == errno.ENOSPC:
                raise ArenaError(
                    f"no room for a {size >> 20} MiB arena in {directory}: enlarge it "
                    "(Kubernetes: an emptyDir with medium Memory) or lower the host cache size"
                ) from e
            raise ArenaError(f"cannot size shared-memory arena {path}: {e}") from e
        finally:
            os.unlink(tmp)
        try:
            return cls(name, directory, fd, size, owner=True)
        except (OSError, ValueError) as e:
            os.unlink(path)
            raise ArenaError(f"cannot map shared-memory arena {path}: {e}") from e

    @classmethod
    def sweep_stale(cls, prefix: str, directory: str = SHM_DIR) -> list[str]:
        """Remove arenas named `prefix...` whose creator is gone (no flock held).

        Names only: a process that still maps an orphan keeps its memory. Only
        regular files of this user are touched, opened without blocking or
        following a link: the directory is shared (/dev/shm), and a FIFO or a
        link planted under such a name must not hang or redirect the sweep.
        """
        removed = []
        try:
            entries = os.listdir(directory)
        except OSError as e:
            raise ArenaError(f"cannot use {directory} for arenas: {e}") from e
        for entry in entries:
            named = entry.startswith(prefix) and _NAME.fullmatch(entry)
            half_made = entry.startswith(f".{prefix}") and entry.endswith(".creating")
            if not (named or half_made):
                continue
            path = os.path.join(directory, entry)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                    continue  # not an arena this user made
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live owner holds it
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed.append(entry)
            finally:
                os.close(fd)
        if removed:
            log.info("removed orphaned arenas count=%d names=%s", len(removed), ",".join(removed))
        return removed

    @classmethod
    def attach(
        cls,
        name: str,
        size: int | None = None,
        directory: str = SHM_DIR,
        writable: bool = True,
        owner_uid: int | None = None,
    ) -> SharedArena:
        """`writable=False`: opened and mapped read-only (a write faults).
        `owner_uid`: the user the file must belong to (the node's), open to
        nobody beyond its group: an engine writes its KV only into its node's
        arena, not into a file another user put under the arena's name."""
        path = cls.path_of(name, directory)
        mode = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(path, mode | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as e:
            raise ArenaError(f"cannot open shared-memory arena {path}: {e}") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ArenaError(f"{path} is not an arena (not a regular file)")
        if owner_uid is not None and (st.st_uid != owner_uid or st.st_mode & 0o007):
            os.close(fd)
            raise ArenaError(
                f"{path} is not the node's arena: owner uid {st.st_uid} (the node's is "
                f"{owner_uid}), mode {stat.S_IMODE(st.st_mode):04o} (nothing for others)"
            )
        actual = st.st_size
        if actual == 0 or (size is not None and actual != size):
            os.close(fd)
            raise ArenaError(f"arena {path} is {actual} bytes, expected {size or 'more'}")
        try:
            return cls(name, directory, fd, actual, owner=False, writable=writable)
        except (OSError, ValueError) as e:
            raise ArenaError(f"cannot map shared-memory arena {path}: {e}") from e

    def reopen(self) -> int:
        """A new descriptor of this arena's file (its own open file, without
        the creator's lock): what another process is given to map it."""
        if self._mmap is None or not self.owner:
            raise ArenaError("only a live creator's arena can be handed on")
        return os.open(f"/proc/self/fd/{self._lock_fd}", os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        """Unmap (and unlink, for the creator). Idempotent."""
        if self._mmap is None:
            return
        self.array = np.empty(0, dtype=np.uint8)
        mm, self._mmap = self._mmap, None
        # If a caller still holds a view, the mapping goes when that view does.
        with contextlib.suppress(BufferError):
            mm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path_of(self.name, self.directory))
            os.close(self._lock_fd)
            self._lock_fd = -1

    def huge_page_bytes(self, pid: int | str = "self") -> int:
        """How much of process `pid`'s mapping of this arena sits in huge pages
        (from /proc/<pid>/smaps): whether `huge=always` really took."""
        total, inside = 0, False
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                    inside = (fields[3], fields[4]) == self._smaps_id
                elif inside and fields[0] in ("ShmemPmdMapped:", "FilePmdMapped:"):
                    total += int(fields[1]) * 1024
        return total

    def __enter__(self) -> SharedArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
