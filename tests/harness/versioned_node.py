"""`kvbm node` acting another protocol version, for the version-skew tests'
refused pairs: a release two versions away cannot be built from git before
it exists, so this node says another version and applies the rule of
kvbm/versions.py from there (the wire it speaks is this release's, which
is all a refusal needs). The product has no switch for it; a test starts
this module instead of the `kvbm` command:
`python -m tests.harness.versioned_node PROTOCOL [--acting-window W] FLAGS`
takes the flags of `kvbm node` (a window wider than the rule's makes a node
that talks to an engine or a peer which then refuses it)."""

from __future__ import annotations

import argparse
import sys

from kvbm.config_text import add_flags, from_args
from kvbm.logs import setup_logging
from kvbm.node import daemon
from kvbm.versions import Compatibility

COMMAND = (sys.executable, "-m", "tests.harness.versioned_node")


def main() -> int:
    parser = argparse.ArgumentParser(prog="versioned-node")
    parser.add_argument("protocol", type=int)
    parser.add_argument("--acting-window", type=int, default=1)
    add_flags(parser)
    args = parser.parse_args()
    cfg = from_args(args)
    setup_logging(cfg.log_level)
    return daemon.run(cfg, versions=Compatibility(args.protocol, args.acting_window))


if __name__ == "__main__":
    sys.exit(main())
