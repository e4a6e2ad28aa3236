"""Quiet, structured logs: one line per event, `key=value` fields, warnings and
up by default."""

from __future__ import annotations

import logging
import sys

FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


def setup_logging(level: str = "warning") -> None:
    """For kvbm's own processes (the node, the CLI)."""
    logging.basicConfig(
        stream=sys.stderr, level=getattr(logging, level.upper()), format=FORMAT, force=True
    )


def attach_logging(level: str = "warning") -> None:
    """Inside someone else's process (an engine): kvbm's loggers get a handler
    of their own and leave the host's logging as it is."""
    for name in ("kvbm", "transport", "discovery"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT))
            logger.addHandler(handler)
            logger.propagate = False
