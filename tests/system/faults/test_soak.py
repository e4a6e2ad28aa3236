"""`kvbm bench soak`, short: three nodes, a random load, a fault every two
seconds of every kind (node SIGKILL + restart, SIGSTOP, etcd SIGKILL +
restart, disk bytes flipped): no wrong block reaches an engine, the nodes
catch corrupt blocks (so "no wrong block" is not for want of any), nothing
hangs, no pin or lease outlives its engine. Negative control, the same seed,
faults and length: with nodes that do not verify (tests/harness/unverified_node.py,
started by the test itself), flipped bytes do reach engines, and the soak's
own content check sees them."""

from __future__ import annotations

from kvbm.bench import soak
from tests.harness import unverified_node

SEED, MINUTES, EVERY_S = 3, 0.5, 2.0  # the same for the soak and its negative control


def test_a_short_soak_with_every_fault_delivers_no_wrong_block():
    result = soak.run(minutes=MINUTES, fault_every_s=EVERY_S, seed=SEED)
    assert result["wrong_blocks"] == 0, result
    # not vacuous: bytes were flipped, and the nodes caught corrupt blocks
    assert result["blocks_flipped"] > 0 and result["checksum_failures"] > 0, result
    assert result["leaked_pins"] == 0, result
    assert set(result["faults_by_kind"]) == set(soak.FAULTS), result
    # the load really went through the faults: blocks from every tier, and
    # requests the engines had to recompute while their node was down
    assert all(result["blocks_by_source"].get(s, 0) > 0 for s in ("local_disk", "remote_host")), (
        result
    )
    assert result["fallbacks"] > 0, result
    assert result["max_pull_ms"] < 10_000, result


def test_negative_control_without_checksums_flipped_disk_bytes_reach_engines():
    """The same seed, faults and length with nodes that do not verify."""
    result = soak.run(
        minutes=MINUTES, fault_every_s=EVERY_S, seed=SEED, node_command=unverified_node.COMMAND
    )
    assert result["blocks_flipped"] > 0, result
    assert result["wrong_blocks"] > 0, result
