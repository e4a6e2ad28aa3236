"""The connector across model architectures: real vLLM (CPU build), tiny
random checkpoints built here (tests/harness/tiny_models.py), a real etcd
and two `kvbm node` daemons on 127.0.0.2 and 127.0.0.3.

Each row: vLLM alone answers two prompts of five blocks and a bit (the
reference); an engine on node A computes them and saves their blocks; an
engine on node B then gets them. B loads at least 90% of the blocks its KV
cache group needs, all from A, and answers as vLLM alone. Under full
attention a group needs every full block of a prompt; under a sliding
window, only the blocks the next token still attends to, and B loads no
more than those.

What vLLM 0.32 (CPU) makes of each model with the connector on (measured
here; the geometry node A was set up with is checked below):
- Llama: one FullAttentionSpec group (2 layers, 2 KV heads of 32).
- Llama, tensor parallel 2 (each worker bound to a core of its own):
  one FullAttentionSpec group, one KV head of 32 per worker.
- Gemma 2: vLLM's hybrid KV cache manager makes two groups
  (SlidingWindowSpec of 64 tokens, FullAttentionSpec), on this CPU too (the
  connector declares `SupportsHMA`, so a Mamba hybrid starts). A slot holds
  both groups' layers; the full group needs every block, so B loads every
  block. With `--disable-hybrid-kv-cache-manager` vLLM keeps one
  FullAttentionSpec group of both layers (the window stays in the
  attention's compute): the same geometry, the same keys. Both rows run.
- A Gemma 3-like model (kvbm/gpu_models.py: three sliding-window layers to
  one full, head_dim 64): four groups, three SlidingWindowSpec of one layer
  each and a FullAttentionSpec; a slot holds all four layers.
- Mistral with a window on every layer: one SlidingWindowSpec group (64
  tokens), with or without a connector.
- DeepSeek-V2 (MLA): one MLAAttentionSpec group, one "head" of 576 (the
  latent), the block size forced to 16 by vLLM's CPU MLA backend, and the
  layout LBNHC. Served, B loaded every block but answered otherwise than
  vLLM alone: vLLM's CPU MLA backend computes a prefill over a cached
  prefix otherwise than the whole prompt (which is why vLLM turns its own
  prefix cache off for it); with vLLM's own prefix cache forced on, vLLM
  alone answered as B did, token for token. So the connector refuses MLA on
  CPU (logged, told to the node): the row checks that both engines run
  without it and answer as vLLM alone. MLA's bytes round-trip bit-exact in
  tests/integration/test_kv_layouts.py.

- A Granite 4.0-like Mamba2 hybrid (kvbm/gpu_models.py): two groups, one
  of Mamba state. Refused; the engines start with kvbm configured and
  answer as vLLM alone (without `SupportsHMA`, vLLM turned its hybrid
  manager off and the engine did not start: "Failed to promote local KV
  cache specs to one unified type").

Every engine runs vLLM's engine core inside its own process (`IN_PROCESS`,
half the start-up); the connector across vLLM's default processes is
proven in test_vllm_connector.py. What is under test here is what each
architecture's KV cache looks like to the connector.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from kvbm.connector.attach import Available, NodeAttachment, node_stats
from kvbm.connector.identity import checkpoint_identity
from kvbm.engine_wire import geometry_to_wire
from kvbm.gpu_models import build_gemma3_like, build_mamba_hybrid
from kvbm.layout import ModelGeometry
from tests.harness.node_daemon import Daemon, until
from tests.harness.tiny_llama import build
from tests.harness.tiny_models import WINDOW, build_deepseek_mla, build_gemma2, build_mistral_window
from tests.harness.vllm_runs import BLOCK, IN_PROCESS, prompt

pytestmark = pytest.mark.slow

PROMPTS = [prompt(1, 5 * BLOCK + 4), prompt(2, 5 * BLOCK + 4)]
# what says a connector did not serve its engine (kvbm/connector/vllm/)
CONNECTOR_DOWN = ("kvbm connector off", "kvbm disabled", "kvbm node unavailable", "save failed")


class OutputsDiffer(AssertionError):
    """B answered otherwise than vLLM alone (and everything else held)."""


@dataclass(frozen=True)
class Row:
    """A model, and what vLLM (CPU, connector on) makes of it."""

    name: str
    build: Callable[[str], str]
    geometry: ModelGeometry  # one worker's share of the one KV cache group
    window: int | None = None  # tokens, where vLLM frees blocks behind a sliding window
    tp: int = 1
    refused: str = ""  # the connector turns itself off for this model, saying this
    env: dict[str, str] = field(default_factory=dict)
    groups: tuple[str, ...] = ("FullAttentionSpec",)  # vLLM's KV cache groups, by kind

    def needed(self, tokens: list[int]) -> int:
        """Blocks of `tokens` the group needs to answer: every full block
        but one that ends with the last token (vLLM computes that token
        itself); under a window, those from the first block the next token
        attends to (vLLM skips `computed - window + 1` tokens)."""
        block = self.geometry.block_size
        usable = (len(tokens) - 1) // block
        if self.window is None:
            return usable
        return usable - max(0, usable * block - self.window + 1) // block


def geometry(layers: int, kv_heads: int, head_dim: int, **kwargs) -> ModelGeometry:
    return ModelGeometry(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, **kwargs)


ROWS = [
    pytest.param(
        Row("llama", build, geometry(2, 2, 32, block_size=BLOCK)),
        id="llama",
        marks=[
            pytest.mark.support("full-attention", "remote", "vllm-cpu"),
            pytest.mark.support("full-attention", "outputs", "vllm-cpu"),
        ],
    ),
    pytest.param(
        Row(
            "llama-tp2",
            build,
            geometry(2, 1, 32, block_size=BLOCK),
            tp=2,
            # vLLM's automatic binding wants a NUMA node per worker; this machine has one
            env={"TEST_TP": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        ),
        id="llama-tp2",
        marks=[
            pytest.mark.support("tensor-parallel", "hits", "vllm-cpu"),
            pytest.mark.support("tensor-parallel", "remote", "vllm-cpu"),
            pytest.mark.support("tensor-parallel", "outputs", "vllm-cpu"),
        ],
    ),
    pytest.param(
        Row(
            "gemma2-one-group",
            build_gemma2,
            geometry(2, 2, 32, block_size=BLOCK),
            env={"TEST_ONE_KV_GROUP": "1"},
        ),
        id="gemma2-one-group",
        marks=[
            pytest.mark.support("window-as-full", "hits", "vllm-cpu"),
            pytest.mark.support("window-as-full", "remote", "vllm-cpu"),
            pytest.mark.support("window-as-full", "outputs", "vllm-cpu"),
        ],
    ),
    pytest.param(
        Row(
            "gemma2-hybrid",
            build_gemma2,
            geometry(2, 2, 32, block_size=BLOCK),
            groups=("SlidingWindowSpec", "FullAttentionSpec"),
        ),
        id="gemma2-hybrid",
        marks=[
            pytest.mark.support("full-and-sliding", "hits", "vllm-cpu"),
            pytest.mark.support("full-and-sliding", "remote", "vllm-cpu"),
            pytest.mark.support("full-and-sliding", "outputs", "vllm-cpu"),
        ],
    ),
    pytest.param(
        Row(
            "gemma3-hybrid",
            build_gemma3_like,
            geometry(4, 2, 64, block_size=BLOCK),
            groups=("SlidingWindowSpec",) * 3 + ("FullAttentionSpec",),
        ),
        id="gemma3-hybrid",
        marks=[
            pytest.mark.support("full-and-sliding", "hits", "vllm-cpu"),
            pytest.mark.support("full-and-sliding", "remote", "vllm-cpu"),
            pytest.mark.support("full-and-sliding", "outputs", "vllm-cpu"),
        ],
    ),
    pytest.param(
        Row(
            "mamba-hybrid",
            build_mamba_hybrid,
            geometry(2, 2, 32, block_size=BLOCK),  # not read: refused
            refused="kvbm stores KV cache groups of full, MLA, sliding-window or chunked-local "
            "attention; this model has 2 group(s) of ['FullAttentionSpec', 'MambaSpec']",
        ),
        id="mamba-hybrid",
        marks=pytest.mark.support("mamba-hybrid", "outputs", "vllm-cpu", refused="mamba-state"),
    ),
    pytest.param(
        Row(
            "mistral-window",
            build_mistral_window,
            geometry(2, 2, 32, block_size=BLOCK),
            WINDOW,
            groups=("SlidingWindowSpec",),
        ),
        id="mistral-window",
        marks=[
            pytest.mark.support("sliding-window", "hits", "vllm-cpu"),
            pytest.mark.support("sliding-window", "remote", "vllm-cpu"),
            pytest.mark.support("sliding-window", "outputs", "vllm-cpu"),
        ],
    ),
    pytest.param(
        Row(
            "deepseek-mla",
            build_deepseek_mla,
            geometry(2, 1, 576, block_size=16, kv_layout="LBNHC", head_dim_v=0),
            refused="vLLM's CPU MLA backend computes a prefill over a cached prefix otherwise",
        ),
        id="deepseek-mla",
        marks=pytest.mark.support("mla", "outputs", "vllm-cpu", refused="mla-on-cpu"),
    ),
]


def expect_connector_on(answer: dict) -> None:
    lines = answer["stderr"].splitlines()
    down = [line for line in lines if any(word in line for word in CONNECTOR_DOWN)]
    assert not down, down


def engine_hashes(att: NodeAttachment, model: str, tokens: list[int], block: int) -> list[int]:
    """The sequence hashes the connector gives a plain prompt's blocks on the
    engines these tests run (float32)."""
    seed = att.hasher.seed(checkpoint_identity(model, dtype="float32"))
    return att.hasher.sequence_hashes(tokens, block, seed)


def shows_on_a_host(probe: NodeAttachment, keys: list) -> bool:
    """Whether the probe's key view shows all of `keys` in a peer's host tier."""
    return probe.seen(keys) == Available(local=0, remote_host=len(keys))


def wait_for_peer_blocks(b: Daemon, row: Row, model: str) -> None:
    """Until node B's key view shows the blocks of the prompts that B's
    engine needs held by a peer, for each worker's share: B's engine then
    finds them as it would on a node that has served a while (the view's
    first seconds send every lookup to the node; kvbm/node/publisher.py,
    REBUILD_S)."""
    block = row.geometry.block_size
    probes = [
        NodeAttachment(b.socket, row.geometry, rank=rank, remote=["host"]) for rank in range(row.tp)
    ]
    try:
        for probe in probes:
            for p in PROMPTS:
                usable = (len(p) - 1) // block
                hashes = engine_hashes(probe, model, p, block)[usable - row.needed(p) : usable]
                keys = probe.keys(hashes)
                shown = functools.partial(shows_on_a_host, probe, keys)
                until(shown, 15, "node B's key view never showed node A's blocks")
    finally:
        for probe in probes:
            probe.close()


@pytest.mark.parametrize("row", ROWS)
def test_an_engine_on_node_b_loads_what_an_engine_on_node_a_computed(
    row, vllm_engines, etcd, daemons, tmp_path
):
    model = row.build(str(tmp_path / "model"))
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--host-cache-mb", "8"]
    a = daemons("node-a", "127.0.0.2", *common)
    b = daemons("node-b", "127.0.0.3", *common)
    env = {**IN_PROCESS, **row.env}

    reference = vllm_engines.outputs(model, PROMPTS, env=env)
    assert len({tuple(r) for r in reference}) == len(PROMPTS), "the prompts answer alike"
    on_a = vllm_engines.answer(model, PROMPTS, a.socket, env=env)
    if row.refused:  # off, saying why, and the engines run on as vLLM alone
        assert row.refused in on_a["stderr"], on_a["stderr"][-3000:]
        assert on_a["outputs"] == reference
        on_b = vllm_engines.answer(model, PROMPTS, b.socket, "host", env=env)
        assert on_b["outputs"] == reference
        assert not node_stats(b.socket).get("engine_blocks"), "a refused engine loaded blocks"
        [told] = node_stats(a.socket)["engine_refusals"]
        assert told["reason"].startswith(row.refused)
        return
    expect_connector_on(on_a)
    assert on_a["outputs"] == reference
    assert on_a["kv_cache_groups"] == list(row.groups)  # as vLLM's scheduler has them
    assert node_stats(a.socket)["geometry"] == geometry_to_wire(row.geometry), "another KV cache"
    wait_for_peer_blocks(b, row, model)

    on_b = vllm_engines.answer(model, PROMPTS, b.socket, "host", env=env)
    expect_connector_on(on_b)
    loaded = node_stats(b.socket)["engine_blocks"]
    needed = row.tp * sum(row.needed(p) for p in PROMPTS)  # each worker loads its share
    assert loaded["remote_host"] >= math.ceil(0.9 * needed), (loaded, needed)
    assert sum(loaded.values()) == loaded["remote_host"], loaded  # B held nothing itself
    if row.window is not None:  # the connector read the group's window
        assert loaded["remote_host"] <= needed, (loaded, needed)
    if on_b["outputs"] != reference:
        raise OutputsDiffer(f"B answered {on_b['outputs']}, vLLM alone {reference}")
