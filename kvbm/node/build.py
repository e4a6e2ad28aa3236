"""The node's tiers as its configuration asks for them: the directories
checked when the node starts, the pools and the block manager built when
the first engine's hello names the model geometry."""

from __future__ import annotations

import os

from kvbm.admission import FrequencyFilter
from kvbm.config import KvbmConfig
from kvbm.disk_file import open_disk_directory
from kvbm.disk_pool import DiskPool
from kvbm.errors import KvbmError
from kvbm.hashing import Verify, content_matches, disk_key
from kvbm.host_pool import HostPool
from kvbm.layout import ModelGeometry
from kvbm.manager import BlockManager


def check_directories(cfg: KvbmConfig) -> None:
    """Fail at the node's start, not at the first engine's hello."""
    arena_dir = cfg.host_arena_dir
    if not os.path.isdir(arena_dir) or not os.access(arena_dir, os.W_OK | os.X_OK):
        raise KvbmError(f"host_arena_dir {arena_dir} is not a writable directory")
    if cfg.disk_enabled:  # the node user's own, closed to others (kvbm/disk_file.py)
        os.close(open_disk_directory(cfg.disk_cache_dir))


def build_manager(
    cfg: KvbmConfig,
    geometry: ModelGeometry,
    verify: Verify = content_matches,
    *,
    secret: bytes,
    node_id: str,
) -> BlockManager:
    """The node's tiers as the configuration asks for them; `verify` checks
    every block that comes back from disk or from a peer. The disk tier's
    file is sealed with a key of the node's `secret` and `node_id`."""
    gid = cfg.shared_gid
    host = HostPool(
        geometry,
        cfg.host_cache_mb << 20,
        mode=0o600 if gid is None else 0o660,
        gid=gid,
        directory=cfg.host_arena_dir,
    )
    disk = None
    try:
        if cfg.disk_enabled:
            disk = DiskPool(
                geometry,
                cfg.disk_cache_dir,
                cfg.disk_cache_mb << 20,
                preallocate=cfg.disk_preallocate,
                direct_io=cfg.disk_direct_io,
                verify=verify,
                mac_key=disk_key(secret, node_id),
            )
        admission = FrequencyFilter(cfg.disk_admit_min_uses)
        return BlockManager(geometry, host, disk, admission, verify=verify)
    except BaseException:
        if disk is not None:
            disk.close()
        host.close()
        raise
