"""G3: the node's disk tier, one preallocated file cut into slots.

File layout (all offsets page aligned, so O_DIRECT moves slots straight
between the file and the host arena):

    [superblock: 1 page][header table: 1 page per slot][data: slot_bytes per slot]

Data sits contiguous, so a span of slots is one plain I/O, as fast as the disk.
A slot's header (key, checksum, the key's group anchor, the data's seal,
its own keyed sum) is written after its data:
after a crash a header either names the block whose bytes are there, or an
older block whose seal the new bytes fail. A new process recovers the
blocks from the header table; every read verifies the data against the
seal and the checksum, so a corrupted, torn or forged slot is a miss, never
wrong bytes. The sums are keyed with the node's disk key (kvbm/disk_seal.py),
and the file is opened only when it is the node user's own
(kvbm/disk_file.py): neither another user nor whoever could write the file
while the node was stopped can make it serve bytes the node did not write.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from kvbm.block_key import MAX_ENCODED, BlockKey, parse_key
from kvbm.disk_file import open_disk_directory, open_disk_file, reserve_file
from kvbm.disk_seal import HEADER, SEAL_BYTES, SUM_BYTES, SUPER, DiskSeal
from kvbm.errors import DiskTierError
from kvbm.hashing import Verify, content_matches
from kvbm.host_pool import HostPool
from kvbm.layout import PAGE, ModelGeometry, slot_spans
from kvbm.slot_table import SlotTable
from kvbm.versions import DISK_FILE, DISK_SLOT, DISK_SLOT_DROPPED

log = logging.getLogger("kvbm.disk")

MAGIC = b"KVBMG3\x00\x01"
SLOT_MAGIC = b"KVBMSLOT"
_SUPER = struct.Struct(
    "<8sIQQQQ"
)  # magic, version, slot_bytes, num_slots, block_bytes, fingerprint
_HEADER = struct.Struct(
    "<8sIQQH"
)  # magic, version, data_len, checksum, key_len (then key, anchor, seal, sum)
_ANCHOR = struct.Struct("<Q")  # after the key
_MAX_IOV = 1024
IO_PIECE_BYTES = 16 << 20  # one vectored I/O; the bench's raw reference uses the same
# After the file system says it is full, the tier takes no writes this long:
# each would fail (a sparse file grows as it is written), costing a checksum
# and a syscall, and the slots that do take writes are its oldest blocks'.
NO_SPACE_BACKOFF_S = 10.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True, slots=True)
class DiskWrite:
    """One block to write: its key and checksum, from host slot `src` into disk slot `dst`."""

    key: BlockKey
    checksum: int | None  # None: taken by the write
    src: int
    dst: int
    anchor: int = 0  # the key's group anchor (kvbm/slot_table.py), kept in the header


@dataclass(frozen=True, slots=True)
class DiskRead:
    key: BlockKey
    checksum: int
    src: int  # disk slot
    dst: int  # host slot


def _aligned(nbytes: int) -> mmap.mmap:
    """Page-aligned scratch memory, as O_DIRECT needs."""
    return mmap.mmap(-1, max(PAGE, nbytes))


def arena_path(directory: str, geometry: ModelGeometry) -> str:
    """One file per geometry, so nodes never mix layouts in one file."""
    return os.path.join(directory, f"kvbm-g3-{geometry.fingerprint:016x}.arena")


class DiskPool:
    """Bookkeeping in `table`; this class adds the file. Not thread-safe for
    bookkeeping (the manager serialises); `write` and `read` touch only slots
    the caller reserved, so several may run at once."""

    def __init__(
        self,
        geometry: ModelGeometry,
        directory: str,
        capacity_bytes: int,
        *,
        preallocate: bool = True,
        direct_io: bool = True,
        verify: Verify = content_matches,
        mac_key: bytes,
    ) -> None:
        """`mac_key`: the node's disk key (`disk_key` in kvbm/hashing.py); a
        file sealed under another key is started empty, never served."""
        self.geometry = geometry
        self._verify = verify
        self._seal = DiskSeal(mac_key)
        self.slot_bytes = geometry.slot_bytes
        num_slots = (capacity_bytes - PAGE) // (PAGE + self.slot_bytes)
        if num_slots < 1:
            raise ValueError(
                f"disk tier of {capacity_bytes} bytes cannot hold one "
                f"{PAGE + self.slot_bytes}-byte slot"
            )
        self.path = arena_path(directory, geometry)
        self.data_start = PAGE + num_slots * PAGE
        self.size = self.data_start + num_slots * self.slot_bytes
        self.table = SlotTable(num_slots)
        self._super = _SUPER.pack(
            MAGIC, DISK_FILE, self.slot_bytes, num_slots, geometry.block_bytes, geometry.fingerprint
        )
        self._seals = bytearray(num_slots * SEAL_BYTES)  # of each slot's data, from its header
        self.direct_io = False
        self._no_space_until = 0.0  # monotonic time; see `has_room`
        dir_fd = open_disk_directory(directory)
        try:
            self.fd = self._open(dir_fd, direct_io, preallocate)
        finally:
            os.close(dir_fd)
        # Two I/O threads keep two requests in flight.
        self._io = ThreadPoolExecutor(2, thread_name_prefix="kvbm-disk-io")
        try:
            self.recovered = self._recover()
        except BaseException:
            self.close()
            raise

    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    # -- opening -----------------------------------------------------------
    def _open(self, dir_fd: int, direct_io: bool, preallocate: bool) -> int:
        fd, self.direct_io = open_disk_file(dir_fd, self.path, direct_io)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise DiskTierError(
                    f"{self.path} is in use by another kvbm process; "
                    "give each node its own disk_cache_dir"
                ) from e
            if self._superblock_matches(fd):
                return fd
            if os.fstat(fd).st_size and not self._is_ours(fd):
                raise DiskTierError(
                    f"{self.path} exists and is not a kvbm disk arena; refusing to overwrite it"
                )
            if os.fstat(fd).st_size and self._read_page(fd, 0)[: _SUPER.size] == self._super:
                log.warning(
                    "disk arena was sealed under another key (the node's secret or id "
                    "changed): starting it empty path=%s",
                    self.path,
                )
            elif os.fstat(fd).st_size:
                log.warning(
                    "disk arena layout changed (%s); starting it empty path=%s",
                    self._layout_change(fd),
                    self.path,
                )
            # The superblock goes first: a crash while reserving leaves a file
            # that is recognisably ours, to be recreated, never refused.
            os.ftruncate(fd, 0)
            self._pwrite(fd, [self._page(self._sealed_super())], 0)
            os.fsync(fd)
            reserve_file(fd, self.path, self.size, preallocate)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _read_page(self, fd: int, offset: int) -> bytes:
        buf = _aligned(PAGE)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])

    def _superblock_matches(self, fd: int) -> bool:
        if os.fstat(fd).st_size != self.size:
            return False
        expect = self._sealed_super()
        return self._read_page(fd, 0)[: len(expect)] == expect

    def _sealed_super(self) -> bytes:
        return self._super + self._seal.sum(SUPER, self._super)

    def _layout_change(self, fd: int) -> str:
        """What differs between the file's superblock and this node's: its
        layout version (kvbm/versions.py: another release wrote it), or its sizes."""
        version = _SUPER.unpack_from(self._read_page(fd, 0))[1]
        if version != DISK_FILE:
            return f"the file's layout version is {version}, this node's {DISK_FILE}"
        return "another slot size, slot count or block size"

    def _is_ours(self, fd: int) -> bool:
        return self._read_page(fd, 0)[: len(MAGIC)] == MAGIC

    @staticmethod
    def _page(data: bytes) -> mmap.mmap:
        buf = _aligned(PAGE)
        buf[: len(data)] = data
        return buf

    # -- recovery ----------------------------------------------------------
    def _recover(self) -> int:
        """Register every slot whose header is intact; data is verified on read."""
        found: dict[BlockKey, tuple[int, int, int, bytes]] = {}
        self._old_headers = self._bad_headers = 0
        batch = 256
        buf = _aligned(batch * PAGE)
        for first in range(0, self.num_slots, batch):
            n = min(batch, self.num_slots - first)
            view = memoryview(buf)[: n * PAGE]
            got = os.preadv(self.fd, [view], self.header_offset(first))
            view.release()
            for j in range(got // PAGE):
                parsed = self._parse_header(buf[j * PAGE : (j + 1) * PAGE])
                if parsed is not None:
                    found.setdefault(parsed[0], (first + j, *parsed[1:]))
        self.table.claim([slot for slot, *_ in found.values()])
        for key, (slot, csum, anchor, seal) in found.items():
            self._seals[slot * SEAL_BYTES : (slot + 1) * SEAL_BYTES] = seal
            self.table.register(slot, key, csum, anchor)
        if found:
            log.info("disk arena recovered blocks=%d path=%s", len(found), self.path)
        if self._old_headers:
            log.warning(
                "disk arena dropped blocks of an older key version blocks=%d path=%s",
                self._old_headers,
                self.path,
            )
        if self._bad_headers:
            log.warning(
                "disk arena dropped blocks whose header fails its keyed sum (a torn write, "
                "or the file was altered) blocks=%d path=%s",
                self._bad_headers,
                self.path,
            )
        return len(found)

    # -- I/O ---------------------------------------------------------------
    def header_offset(self, slot: int) -> int:
        return PAGE + slot * PAGE

    def data_offset(self, slot: int) -> int:
        return self.data_start + slot * self.slot_bytes

    def _header(self, key: BlockKey, csum: int, anchor: int, seal: bytes) -> bytes:
        size = self.geometry.block_bytes
        head = _HEADER.pack(SLOT_MAGIC, DISK_SLOT, size, csum, len(key)) + key
        head += _ANCHOR.pack(anchor) + seal
        return head + self._seal.sum(HEADER, head)

    def _parse_header(
        self, page: bytes | memoryview | mmap.mmap
    ) -> tuple[BlockKey, int, int, bytes] | None:
        """(key, checksum, anchor, seal), or None for a header that is not a
        whole one of ours, sealed under this node's key."""
        magic, version, data_len, csum, klen = _HEADER.unpack_from(page)
        if magic == SLOT_MAGIC and version in DISK_SLOT_DROPPED:
            self._old_headers += 1
            return None
        if magic != SLOT_MAGIC or version != DISK_SLOT:
            return None
        if data_len != self.geometry.block_bytes or klen > MAX_ENCODED:
            return None
        end = _HEADER.size + klen
        (anchor,) = _ANCHOR.unpack_from(page, end)
        seal = bytes(page[end + _ANCHOR.size : end + _ANCHOR.size + SEAL_BYTES])
        end += _ANCHOR.size + SEAL_BYTES
        if not self._seal.sum_ok(HEADER, bytes(page[:end]), bytes(page[end : end + SUM_BYTES])):
            self._bad_headers += 1
            return None
        key = bytes(page[_HEADER.size : _HEADER.size + klen])
        try:
            if parse_key(key).fingerprint != self.geometry.fingerprint:
                return None  # another model's block: never served for this one
        except ValueError:
            return None  # not a key: not a slot of ours
        return BlockKey(key), csum, anchor, seal

    def _pwrite(self, fd: int, bufs: list, offset: int) -> None:
        want = sum(len(memoryview(b)) for b in bufs)
        done = os.pwritev(fd, bufs, offset)
        if done != want:  # to a regular file: the file system is full
            raise OSError(errno.ENOSPC, f"short write: {done} of {want} bytes")

    def _pieces(self, slots: list[int]) -> list[tuple[int, list[int]]]:
        """Split item indices, sorted by disk slot, into (first slot, indices) pieces
        of consecutive slots, each one vectored I/O of at most IO_PIECE_BYTES."""
        order = sorted(range(len(slots)), key=slots.__getitem__)
        cap = max(1, min(_MAX_IOV, IO_PIECE_BYTES // self.slot_bytes))
        out = []
        for first, n, off in slot_spans(np.asarray([slots[i] for i in order], dtype=np.int64)):
            for start in range(0, n, cap):
                out.append((first + start, order[off + start : off + min(n, start + cap)]))
        return out

    def write(self, items: list[DiskWrite], host: HostPool) -> list[int | None]:
        """Host slots -> disk slots: all the data first, then the headers naming it.

        Returns each block's checksum (taken here where the item has none), or
        None where its write failed (disk full, I/O error): a failure costs only
        its own piece. Each I/O thread checksums its piece just before writing
        it; headers go last, one write per span of slots, so a batch costs one
        small write on top of its data.
        """
        sums: list[int | None] = [None] * len(items)
        seals: list[bytes] = [b""] * len(items)
        for idx, result in self._run_pieces(
            self._write_data, items, [it.dst for it in items], host
        ):
            for i, sealed in zip(idx, result, strict=True):
                if sealed is not None:
                    sums[i], seals[i] = sealed
        written = sorted(
            (i for i, c in enumerate(sums) if c is not None), key=lambda i: items[i].dst
        )
        dsts = np.asarray([items[i].dst for i in written], dtype=np.int64)
        for first, n, off in slot_spans(dsts):
            span = written[off : off + n]
            heads = [(items[i].key, sums[i], items[i].anchor, seals[i]) for i in span]
            if not self._write_headers(first, heads):  # type: ignore[arg-type]
                for i in span:
                    sums[i] = None
                continue
            for i in span:
                dst = items[i].dst
                self._seals[dst * SEAL_BYTES : (dst + 1) * SEAL_BYTES] = seals[i]
        return sums

    def _write_data(self, first: int, piece: list[DiskWrite], host: HostPool) -> list:
        """(checksum, seal) of each block of the piece, or None each where its write failed."""
        todo = [it.src for it in piece if it.checksum is None]
        taken = iter(host.checksums(todo))
        sums = [next(taken) if it.checksum is None else it.checksum for it in piece]
        seals = [self._seal.seal(host.block_view(it.src)) for it in piece]
        try:
            bufs = [host.slot_buffer(it.src) for it in piece]
            self._pwrite(self.fd, bufs, self.data_offset(first))
            return list(zip(sums, seals, strict=True))
        except OSError as e:
            self._failed_write(e, len(piece))
            return [None] * len(piece)

    def _write_headers(self, first: int, entries: list[tuple[BlockKey, int, int, bytes]]) -> bool:
        headers = _aligned(len(entries) * PAGE)
        for j, (key, csum, anchor, seal) in enumerate(entries):
            h = self._header(key, csum, anchor, seal)
            headers[j * PAGE : j * PAGE + len(h)] = h
        try:
            self._pwrite(self.fd, [headers], self.header_offset(first))
            return True
        except OSError as e:
            self._failed_write(e, len(entries))
            return False

    def _failed_write(self, e: OSError, blocks: int) -> None:
        if e.errno in _NO_SPACE:
            if self.has_room():
                log.warning(
                    "the disk tier's file system is full: no writes to it for %.0f s error=%s",
                    NO_SPACE_BACKOFF_S,
                    e,
                )
            self._no_space_until = time.monotonic() + NO_SPACE_BACKOFF_S
        else:
            log.warning("disk write failed blocks=%d error=%s", blocks, e)

    def has_room(self) -> bool:
        """False for a while after a write found the file system full."""
        return time.monotonic() >= self._no_space_until

    def read(self, items: list[DiskRead], host: HostPool) -> list[bool | None]:
        """Disk slots -> host slots. Per item: True where the bytes match the
        checksum, False where they do not (corrupt), None where the read itself
        failed (the block may be fine; try again later).

        Each I/O thread reads and verifies its own piece, so pieces overlap.
        """
        ok: list[bool | None] = [None] * len(items)
        for idx, result in self._run_pieces(
            self._read_piece, items, [it.src for it in items], host
        ):
            for i, good in zip(idx, result, strict=True):
                ok[i] = good
        return ok

    def _read_piece(self, first: int, piece: list[DiskRead], host: HostPool) -> list:
        try:
            want = len(piece) * self.slot_bytes
            bufs = [host.slot_buffer(it.dst) for it in piece]
            got = os.preadv(self.fd, bufs, self.data_offset(first))
            if got != want:
                raise OSError(errno.EIO, f"short read: {got} of {want} bytes")
        except OSError as e:
            log.warning("disk read failed blocks=%d error=%s", len(piece), e)
            return [None] * len(piece)
        return [self._intact(host.block_view(it.dst), it) for it in piece]

    def _intact(self, data: memoryview, item: DiskRead) -> bool:
        """Sealed by this node's key as the block its header names, and of its checksum."""
        seal = memoryview(self._seals)[item.src * SEAL_BYTES : (item.src + 1) * SEAL_BYTES]
        return self._seal.opens(data, seal) and self._verify(data, item.checksum)

    def _run_pieces(
        self,
        fn: Callable[[int, list, HostPool], list],
        items: list,
        slots: list[int],
        host: HostPool,
    ) -> Iterator[tuple[list[int], list]]:
        """Run `fn(first_slot, piece_items, host)` for every piece on the I/O threads
        and yield (item indices, result) once *every* piece has finished: a caller
        may free or reuse slots only when no piece still touches them. A piece
        that raises fails alone (its result is None for each item)."""
        pending = [
            (idx, self._io.submit(fn, first, [items[i] for i in idx], host))
            for first, idx in self._pieces(slots)
        ]
        wait([fut for _, fut in pending])
        for idx, fut in pending:
            error = fut.exception()
            if error is not None:
                log.error("disk %s failed blocks=%d error=%r", fn.__name__, len(idx), error)
            yield idx, [None] * len(idx) if error is not None else fut.result()

    def close(self) -> None:
        self._io.shutdown()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
