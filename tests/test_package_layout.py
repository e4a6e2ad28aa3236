"""The dependency direction of DESIGN.md: `kvbm` uses `transport` and `discovery`;
those two never import `kvbm`, nor each other."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = {"transport": {"kvbm", "discovery"}, "discovery": {"kvbm", "transport"}}


def imported_packages(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_packages_never_import_upwards(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for f in files:
        bad = imported_packages(f) & FORBIDDEN[package]
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_no_grab_bag_modules():
    for name in ("utils.py", "helpers.py", "misc.py", "common.py"):
        assert not list(ROOT.glob(f"*/{name}")), name
