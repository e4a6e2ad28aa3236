"""`kvbm node` with block contents NOT verified, for a negative control only
(the soak's: flipped bytes must then reach engines). The product has no
switch for this; a test starts this module instead of the `kvbm` command:
`python -m tests.harness.unverified_node FLAGS` takes the flags of `kvbm node`."""

from __future__ import annotations

import argparse
import logging
import sys

from kvbm.config_text import add_flags, from_args
from kvbm.disk_seal import DiskSeal
from kvbm.logs import setup_logging
from kvbm.node import daemon

COMMAND = (sys.executable, "-m", "tests.harness.unverified_node")


def accept_anything(data: memoryview, expected: int) -> bool:
    return True


def main() -> int:
    # nor the disk tier's seals (kvbm/disk_seal.py), which would catch flipped bytes too
    DiskSeal.opens = lambda self, data, seal: True  # type: ignore[method-assign]
    parser = argparse.ArgumentParser(prog="unverified-node")
    add_flags(parser)
    cfg = from_args(parser.parse_args())
    setup_logging(cfg.log_level)
    logging.getLogger("kvbm.node").warning("block contents are NOT verified (a test's control)")
    return daemon.run(cfg, verify=accept_anything)


if __name__ == "__main__":
    sys.exit(main())
