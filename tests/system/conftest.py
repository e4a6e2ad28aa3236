"""Fixtures of the system tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.vllm_runs import Engines


@pytest.fixture(scope="session")
def vllm_engines() -> Iterator[Engines]:
    """Starts vLLM engine processes, forked from one that imported vLLM once
    (tests/harness/engine_forks.py); stopped, with any engine left, at the end."""
    engines = Engines()
    yield engines
    engines.close()
