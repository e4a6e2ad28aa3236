"""The support marks the matrix generator reads from the source
(tests/harness/support_marks.py, without importing a test) are the marks
pytest collects: the same cells on the same tests, none missed, none
invented. pytest collects every module that names the mark, in a process of
its own."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

from tests.harness.support_marks import MARK, Cell, read_marks

ROOT = pathlib.Path(__file__).resolve().parents[2]
COLLECT = """
import json, sys
import pytest

class Collect:
    def __init__(self):
        self.marks = []

    def pytest_collection_finish(self, session):
        for item in session.items:
            for mark in item.iter_markers("support"):
                self.marks.append([item.nodeid, list(mark.args), dict(mark.kwargs)])

collect = Collect()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[2:]], [collect])
with open(sys.argv[1], "w") as f:
    json.dump(collect.marks, f)
sys.exit(code)
"""


def test_the_marks_read_from_the_source_are_the_marks_pytest_collects(tmp_path):
    files = sorted(
        str(f.relative_to(ROOT))
        for tier in ("unit", "integration", "system")
        for f in (ROOT / "tests" / tier).rglob("test_*.py")
        if f"mark.{MARK}" in f.read_text()
    )
    assert "tests/system/test_vllm_connector.py" in files
    out = tmp_path / "marks.json"
    done = subprocess.run(
        [sys.executable, "-c", COLLECT, str(out), *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # a parametrized test's cases are one test here; a case's own mark is its test's
    collected = {
        (nodeid.split("[")[0], dataclasses.astuple(Cell(*args, **kwargs)))
        for nodeid, args, kwargs in json.loads(out.read_text())
    }
    read = {(p.test.split("[")[0], dataclasses.astuple(p.cell)) for p in read_marks(ROOT)}
    assert read == collected
    assert len(read) > 20  # the marks this branch placed, at least
