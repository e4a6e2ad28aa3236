"""Version skew with real vLLM (CPU build): engines whose connector is the
previous release's (main at old_tree.PREVIOUS, from git) and this one's,
on nodes of the other release, a real etcd, nodes on 127.0.0.2 and .3.

An engine of the previous release on a node of this one computes two
prompts and saves them; an engine of this release on a node of the
previous one loads their prefixes, which its node pulls from the new node.
Both answer as vLLM alone. (Every pair, byte by byte, with a cheaper
engine, and the refused ones: tests/integration/test_version_skew.py.)
"""

from __future__ import annotations

import pytest

from kvbm.connector.attach import NodeAttachment
from kvbm.connector.identity import checkpoint_identity
from kvbm.layout import ModelGeometry
from tests.harness.node_daemon import until
from tests.harness.old_tree import NODE, old_env, old_tree, old_vllm_outputs
from tests.harness.tiny_llama import build
from tests.harness.vllm_runs import BLOCK, prompt

pytestmark = pytest.mark.slow
# what vLLM makes of tests/harness/tiny_llama.py: 2 layers, 2 KV heads of 32, fp32
GEOMETRY = ModelGeometry(num_layers=2, num_kv_heads=2, head_dim=32, block_size=BLOCK)


def prefix_keys(att: NodeAttachment, model: str, tokens: list[int]) -> list:
    """The keys the connector gives a plain prompt's full blocks but the last
    token's (vLLM always computes that one)."""
    seed = att.hasher.seed(checkpoint_identity(model, dtype="float32"))
    hashes = att.hasher.sequence_hashes(tokens, BLOCK, seed)
    return att.keys(hashes[: (len(tokens) - 1) // BLOCK])


def test_vllm_engines_of_either_release_on_nodes_of_the_other_answer_as_vllm_alone(
    vllm_engines, etcd, daemons, tmp_path
):
    model = build(str(tmp_path / "tiny-llama"))
    tree = old_tree(tmp_path)
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--host-cache-mb", "8"]
    new = daemons("node-new", "127.0.0.2", *common)
    old = daemons("node-old", "127.0.0.3", *common, command=NODE, env=old_env(tree))
    prompts = [prompt(21), prompt(22)]
    reference = vllm_engines.outputs(model, prompts)  # vLLM alone

    # the previous release's engine on this release's node computes and saves
    assert old_vllm_outputs(tree, model, prompts, new.socket) == reference
    on_new = NodeAttachment(new.socket, GEOMETRY)
    on_old = NodeAttachment(old.socket, GEOMETRY, remote=["host"])
    try:
        # its scheduler and its worker said no version (the previous release's)
        assert on_new.stats()["engine_hellos_by_protocol"] == {"1": 2, "2": 1}
        saved = [prefix_keys(on_new, model, p) for p in prompts]
        assert [on_new.lookup(ks).local for ks in saved] == [3, 3], "the old engine saved"
        for ks in saved:
            until(lambda ks=ks: on_old.lookup(ks, ask_node=True).total == 3, 10, "not indexed")

        # this release's engine on the previous release's node: the old node
        # pulls every prefix from the new one, and the outputs are vLLM's
        assert vllm_engines.outputs(model, prompts, old.socket, "host") == reference
        assert on_old.stats()["engine_blocks"]["remote_host"] == 6
    finally:
        on_new.close()
        on_old.close()
