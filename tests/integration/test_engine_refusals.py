"""An engine whose model kvbm cannot serve runs without kvbm, and the
operator finds it: its connector tells the node why, once per engine, and
`kvbm status` (text and `--json`) and the node's `/metrics` show it. A real
`kvbm node` process in each test; the last builds the real vLLM connector,
the scheduler's and two workers', for a model of two KV cache groups."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.request

import pytest

from kvbm.connector.attach import NodeAttachment, NodeError, Refusal, report_refusal
from kvbm.engine_wire import EngineLink
from tests.harness.node_daemon import kvbm_json
from tests.harness.ports import free_port
from tests.harness.support import GEOMETRY

PP = Refusal(
    "llama-8b",
    "kvbm does not store KV caches split by decode_context_parallel_size > 1 yet",
    "kv_cache",
)


def status_text(socket: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "kvbm.cli", "status", "--socket", socket],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def refusals_metric(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    prefix = "kvbm_engine_refusals_total{kind="
    return {
        line[len(prefix) :].split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_a_refused_engine_shows_in_status_and_metrics_before_and_after_engines_attach(daemons):
    port = free_port("127.0.0.2")
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "2", "--metrics-port", str(port))
    # one engine restarted twice with decode context parallelism, one whose model has no identity
    report_refusal(node.socket, PP)
    report_refusal(node.socket, PP)
    report_refusal(
        node.socket, Refusal("qwen", "hf_overrides given as a function", "model_identity")
    )
    # a malformed refusal is answered with why, and the node goes on serving
    link = EngineLink(node.socket, timeout=5.0)
    try:
        with pytest.raises(NodeError, match="kind is one of kv_cache, model_identity"):
            link.call("refused", {"model": "m", "reason": "r", "kind": "free text"})
        assert link.call("stats", {})["engine_refusals"][0]["model"] == "qwen"
    finally:
        link.close()

    assert status_text(node.socket)[-3:] == [
        "  no engine has attached yet",
        "  engine refused: qwen: hf_overrides given as a function (1 time)",
        "  engine refused: llama-8b: kvbm does not store KV caches split by "
        "decode_context_parallel_size > 1 yet (2 times)",
    ]
    assert refusals_metric(port) == {"kv_cache": 2.0, "model_identity": 1.0}

    # an engine that kvbm serves attaches: the refusals stay in view
    engine = NodeAttachment(node.socket, GEOMETRY)
    try:
        shown = kvbm_json("status", "--socket", node.socket)
        assert "tiers" in shown
        [qwen, llama] = shown["engine_refusals"]
        assert (llama["model"], llama["kind"], llama["count"]) == ("llama-8b", "kv_cache", 2)
        assert llama["last_seen"] <= qwen["last_seen"]
        assert refusals_metric(port) == {"kv_cache": 2.0, "model_identity": 1.0}
    finally:
        engine.close()


@pytest.fixture(scope="module")
def refused_config(tmp_path_factory):
    """vLLM's configuration of an engine over the tests' tiny model, and a
    KV cache config of two groups (full attention and a Mamba layer's
    state, as vLLM's hybrid manager makes for a Mamba hybrid), which kvbm
    refuses."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        MambaSpec,
    )

    from kvbm.connector.vllm import kv_transfer_config
    from tests.harness.tiny_llama import build
    from tests.harness.vllm_steps import BLOCK, HEAD_SIZE, KV_HEADS, LAYERS

    path = build(str(tmp_path_factory.mktemp("tiny-llama")))
    model = ModelConfig(model=path, dtype="float32", seed=0, max_model_len=1024)

    def config(extra: dict, policy: str = "recompute", groups: int = 2) -> tuple:
        """(`groups` 1: one full-attention group, which kvbm stores.)"""
        made = VllmConfig(
            model_config=model,
            cache_config=CacheConfig(block_size=BLOCK),
            kv_transfer_config=kv_transfer_config(extra, policy),
            device_config=DeviceConfig("cpu"),
        )
        shape = {"block_size": BLOCK, "num_kv_heads": KV_HEADS, "head_size": HEAD_SIZE}
        full = FullAttentionSpec(**shape, dtype=torch.float32)
        mamba = MambaSpec(block_size=BLOCK, shapes=((4, 64),), dtypes=(torch.float32,))
        two = [KVCacheGroupSpec(LAYERS[:1], full), KVCacheGroupSpec(LAYERS[1:], mamba)]
        one = [KVCacheGroupSpec(LAYERS, full)]
        return made, KVCacheConfig(64, [], two if groups == 2 else one)

    return path, config


class Records(logging.Handler):
    """kvbm's log records (its loggers do not propagate inside an engine)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.support("mamba-hybrid", "shape", "vllm-objects", refused="mamba-state")
def test_vllms_connector_tells_the_node_once_per_engine_and_logs_once(daemons, refused_config):
    """vLLM makes the scheduler's connector and one per worker (two here, as
    for tensor parallelism 2): the node hears of the engine once, and the
    reason is logged at error once."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvbm.connector.vllm import KvbmConnector

    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "2")
    model_path, config = refused_config
    vllm_config, cache = config({"node": node.socket})
    records = Records()
    logging.getLogger("kvbm").addHandler(records)
    try:
        roles = [KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER, KVConnectorRole.WORKER]
        made = [KvbmConnector(vllm_config, role, cache) for role in roles]
    finally:
        logging.getLogger("kvbm").removeHandler(records)
    assert all(c.setup.off and c.setup.refusal == "kv_cache" for c in made)

    errors = [r.getMessage() for r in records.records if r.levelno >= logging.ERROR]
    assert errors == ["kvbm connector off, the engine runs without it: " + made[0].setup.off]
    [told] = kvbm_json("status", "--socket", node.socket)["engine_refusals"]
    assert (told["model"], told["kind"], told["count"]) == (model_path, "kv_cache", 1)
    assert told["reason"].startswith("kvbm stores KV cache groups of full, MLA, sliding-window")

    # with no node named, no private node is started just to be told
    vllm_config, cache = config({})
    alone = KvbmConnector(vllm_config, KVConnectorRole.SCHEDULER, cache)
    assert alone.setup.off and alone.setup.private_node is None and alone.setup.refusal is None


def test_a_failure_policy_that_fails_requests_is_warned_of_once_per_engine(daemons, refused_config):
    """kv_load_failure_policy "fail": a failed load fails its request. The
    scheduler's connector says so; its workers do not repeat it."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvbm.connector.vllm import KvbmConnector

    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "2")
    _, config = refused_config
    vllm_config, cache = config({"node": node.socket}, policy="fail", groups=1)
    records = Records()
    logging.getLogger("kvbm").addHandler(records)
    roles = [KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER, KVConnectorRole.WORKER]
    try:
        made = [KvbmConnector(vllm_config, role, cache) for role in roles]
    finally:
        logging.getLogger("kvbm").removeHandler(records)
    try:
        assert all(c.setup.off is None for c in made)
        said = [r for r in records.records if "kv_load_failure_policy" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.WARNING]
    finally:
        for c in made:
            c.shutdown()
