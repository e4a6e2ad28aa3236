"""Fixtures of the security tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def shared_tmp() -> Iterator[str]:
    """A directory like /tmp: root's, sticky, open to everyone."""
    directory = tempfile.mkdtemp(prefix="kvbm-shared-")
    os.chmod(directory, 0o1777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
