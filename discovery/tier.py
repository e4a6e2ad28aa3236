"""The tiers that hold blocks: a node's host memory (G2) and its disk (G3).

The core (kvbm) owns the tiers, but the index records which tier holds a
key and packs it into its records (a run record keeps one disk bit per key,
discovery/runs.py), so the index must know the tiers too. Discovery may not
import kvbm (tests/test_package_layout.py), so the lowest package that needs
the type owns it, in this module of its own: the core imports `Tier` from
here, never from the index's records or its machinery.
"""

from __future__ import annotations

from enum import StrEnum


class Tier(StrEnum):
    HOST = "host"
    DISK = "disk"
