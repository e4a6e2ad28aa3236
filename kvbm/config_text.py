"""The configuration written out: the reference table docs/operations.md carries
(`kvbm config --reference`, kept equal by a test), a TOML file that
`load_config` reads back, and one command-line flag per setting. The
settings themselves, and their one merge, are kvbm/config.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from kvbm.config import CHOICES, ENV_PREFIX, FIELDS, KvbmConfig, load_config


def reference_table() -> str:
    """docs/operations.md's configuration reference, generated from the fields."""
    rows = [
        "| key / flag | environment | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(KvbmConfig):
        default = f.default
        shown = f"`{str(default).lower()}`" if isinstance(default, bool) else f"`{default}`"
        if default == "":
            shown = '`""`'
        rows.append(
            f"| `{f.name}` / `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` "
            f"| {shown} | {f.metadata['doc']} |"
        )
    return "\n".join(rows)


def to_toml(cfg: KvbmConfig) -> str:
    """The effective configuration as a file `load_config` reads back."""
    lines = []
    for f in dataclasses.fields(KvbmConfig):
        v = getattr(cfg, f.name)
        text = (
            str(v).lower()
            if isinstance(v, bool)
            else str(v)
            if isinstance(v, int)
            else json.dumps(v)
        )
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines) + "\n"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting; values reach `load_config` as overrides."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for f in dataclasses.fields(KvbmConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            metavar=_metavar(f.name),
            default=None,
            help=f.metadata["doc"],
        )


def from_args(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> KvbmConfig:
    """Config from parsed flags (see `add_flags`) over the file and environment."""
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(KvbmConfig)}
    return load_config(getattr(args, "config", None), overrides=flags, defaults=defaults)


def _metavar(name: str) -> str:
    """A flag's value in its help: the words it takes, or its type."""
    kind = CHOICES.get(name)
    if kind is not None:
        return "{" + ",".join(m.value for m in kind) + "}"  # type: ignore[attr-defined]
    return str(FIELDS[name].type).upper()
