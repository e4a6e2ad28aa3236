"""Fixtures of the integration tier's connector tests, which drive vLLM's
real `Scheduler` step by step (tests/harness/vllm_steps.py) against one
real `kvbm node`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """vLLM's ModelConfig of the tests' tiny Llama (tests/harness/tiny_llama.py)."""
    from vllm.config import ModelConfig

    from tests.harness.tiny_llama import build

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build(str(tmp_path_factory.mktemp("tiny-llama")))
    return ModelConfig(model=path, dtype="float32", seed=0, max_model_len=1024)


@pytest.fixture
def node(daemons):
    return daemons("solo", "127.0.0.2", "--host-cache-mb", "8")


@pytest.fixture
def engines(model, node) -> Iterator:
    """engines(**kwargs) -> a SteppedEngine on the test's node, closed after the test."""
    from tests.harness.vllm_steps import SteppedEngine

    made: list[SteppedEngine] = []

    def make(**kwargs) -> SteppedEngine:
        made.append(SteppedEngine(model, node.socket, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()
