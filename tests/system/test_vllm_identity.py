"""A hit is the KV the engine would have computed: real vLLM engines on two
real nodes (real etcd), with inputs that block keys once did not see.

Node A's engine computes some requests; node B's engine, which may pull
from A's host tier, then asks for requests that share token ids with them
but not their KV (another cache salt, another checkpoint under one path,
other prompt embeddings, another adapter under one LoRA name), and for the
same ones again. B's outputs must equal vLLM alone, and B's node must count
exactly the pulls of the requests that are really the same. B's first
request is a warm-up that no node holds (except where the first request is
the point), so a test cannot pass merely because a node's first request
used to miss the fleet.

What is under test here is what a key covers, which the scheduler side
reads from vLLM's request whether or not its engine core has a process of
its own: every engine here runs it in-process (`IN_PROCESS`, half the
start-up). The connector across vLLM's default processes is proven in
test_vllm_connector.py.
"""

from __future__ import annotations

import shutil

import pytest

from kvbm.connector.attach import node_stats
from tests.harness.node_daemon import until
from tests.harness.tiny_llama import build, build_blip2, build_lora
from tests.harness.vllm_runs import BLOCK, IN_PROCESS, prompt

pytestmark = pytest.mark.slow

PROMPT = prompt(11)  # 100 tokens: 3 usable blocks
USABLE = (len(PROMPT) - 1) // BLOCK
WARM_UP = prompt(99)


@pytest.fixture
def engine_answer(vllm_engines):
    """vllm_engines.answer with vLLM's engine core inside the engine's process."""

    def answer(*args, env: dict | None = None, **kwargs) -> dict:
        return vllm_engines.answer(*args, env={**IN_PROCESS, **(env or {})}, **kwargs)

    return answer


def two_nodes(etcd, daemons) -> tuple:
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--host-cache-mb", "8"]
    return daemons("node-a", "127.0.0.2", *common), daemons("node-b", "127.0.0.3", *common)


def wait_mirrored(node, blocks: int) -> None:
    """Until `node`'s index mirror holds at least `blocks` locations."""
    until(
        lambda: node_stats(node.socket).get("index_mirror_keys", 0) >= blocks,
        15,
        "node B's mirror never held node A's blocks",
    )


def pulled(node) -> int:
    return node_stats(node.socket)["engine_blocks"]["remote_host"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build(str(tmp_path_factory.mktemp("tiny-llama")))


def test_a_new_nodes_first_request_loads_a_peers_prompt_and_cache_salts_stay_apart(
    model, engine_answer, etcd, daemons
):
    """1f and 1e. B's engine's first request is one A holds: it loads."""
    a, b = two_nodes(etcd, daemons)
    salted = [{"tokens": PROMPT, "cache_salt": s} for s in ("tenant-1", "tenant-2")]
    other = prompt(12)
    reference = engine_answer(model, [other, PROMPT])["outputs"]
    assert engine_answer(model, [other, salted[0]], a.socket)["outputs"] == reference
    wait_mirrored(b, 2 * USABLE)
    served = engine_answer(model, [other, salted[1], salted[0], PROMPT], b.socket, "host")
    assert served["outputs"] == [reference[0], reference[1], reference[1], reference[1]]
    blocks = node_stats(b.socket)["engine_blocks"]
    # the first request loads A's blocks (a new node's first request once missed them) ...
    # ... and of the three salts (two, and none) only A's own salt loads
    assert blocks["remote_host"] == 2 * USABLE, blocks
    assert blocks["local_host"] == 0, blocks


def test_another_checkpoint_under_the_same_path_is_never_loaded(
    engine_answer, etcd, daemons, tmp_path
):
    """1d. A's engine serves checkpoint X from a path; the path then holds
    checkpoint Y (same config, other weights: a new model rolled out under
    one name) when B's engine starts."""
    served_path = str(tmp_path / "model")
    build(served_path, seed=1)
    a, b = two_nodes(etcd, daemons)
    x_answer = engine_answer(served_path, [PROMPT], a.socket)["outputs"]
    shutil.rmtree(served_path)
    build(served_path, seed=2)
    reference = engine_answer(served_path, [WARM_UP, PROMPT])["outputs"]
    assert x_answer[0] != reference[1], "the two checkpoints must answer differently"
    wait_mirrored(b, USABLE)
    served = engine_answer(served_path, [WARM_UP, PROMPT], b.socket, "host")["outputs"]
    assert served == reference
    assert pulled(b) == 0


def test_prompt_embeddings_never_share_blocks(model, engine_answer, etcd, daemons):
    """1b. Two prompts of 100 embeddings each (vLLM holds token id 0 at
    every position), and the prompt of 100 token ids 0: only the same
    embeddings load."""
    a, b = two_nodes(etcd, daemons)
    env = {"TEST_PROMPT_EMBEDS": "1"}
    e1, e2 = ({"embeds_seed": s, "embeds_len": len(PROMPT)} for s in (1, 2))
    zeros = [0] * len(PROMPT)
    reference = engine_answer(model, [WARM_UP, e2, zeros, e1], env=env)["outputs"]
    assert engine_answer(model, [e1], a.socket, env=env)["outputs"] == reference[3:]
    wait_mirrored(b, USABLE)
    served = engine_answer(model, [WARM_UP, e2, zeros, e1], b.socket, "host", env=env)
    assert served["outputs"] == reference
    assert pulled(b) == USABLE  # e1 again, and nothing else


def test_lora_adapters_under_reused_or_swapped_names_never_cross_load(
    model, engine_answer, etcd, daemons, tmp_path
):
    """1c. A serves adapter 1 as "sql" and adapter 2 as "chat"; B serves
    them swapped, "sql" pointed at adapter 2, then the base model, then
    adapter 1 under its old name: only that last one loads."""
    one, two = (build_lora(str(tmp_path / f"lora-{i}"), seed=i) for i in (1, 2))
    env = {"TEST_ENABLE_LORA": "1"}

    def with_lora(name: str, int_id: int, path: str) -> dict:
        return {"tokens": PROMPT, "lora": {"name": name, "id": int_id, "path": path}}

    a, b = two_nodes(etcd, daemons)
    on_a = [with_lora("sql", 1, one), with_lora("chat", 2, two)]
    on_b = [WARM_UP, with_lora("sql", 1, two), with_lora("chat", 2, one), PROMPT, on_a[0]]
    reference = engine_answer(model, [*on_a, PROMPT], env=env)["outputs"]
    assert len({tuple(r) for r in reference}) == 3, "adapters and base must answer differently"
    assert engine_answer(model, on_a, a.socket, env=env)["outputs"] == reference[:2]
    wait_mirrored(b, 2 * USABLE)
    served = engine_answer(model, on_b, b.socket, "host", env=env)["outputs"]
    alone = engine_answer(model, on_b, env=env)["outputs"]
    assert served == alone
    assert served[4] == reference[0]
    assert pulled(b) == USABLE  # adapter 1 as "sql", again


def test_the_same_text_with_another_image_never_loads_the_first_images_blocks(
    engine_answer, etcd, daemons, tmp_path_factory
):
    """1a. A vision model (tests/harness/tiny_llama.py: BLIP-2, whose 8 image tokens
    are one placeholder id, whatever the image): one text, two images. Only
    the same image loads."""
    vlm = build_blip2(str(tmp_path_factory.mktemp("tiny-blip2")))
    text = " ".join(f"w{4 + (i * 37) % 500}" for i in range(90))  # 98 tokens with the image's
    one, two, three = ({"text": text, "image_seed": s} for s in (1, 2, 3))
    a, b = two_nodes(etcd, daemons)
    reference = engine_answer(vlm, [three, two, one])["outputs"]
    assert reference[1] != reference[2], "the two images must answer differently"
    assert engine_answer(vlm, [one], a.socket)["outputs"] == reference[2:]
    wait_mirrored(b, USABLE)
    served = engine_answer(vlm, [three, two, one], b.socket, "host")["outputs"]
    assert served == reference
    assert pulled(b) == USABLE  # image 1 again, and nothing else
