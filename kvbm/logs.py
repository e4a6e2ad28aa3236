"""Quiet, structured logs: one line per event, `key=value` fields, warnings and
up by default."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "warning") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
        force=True,
    )
