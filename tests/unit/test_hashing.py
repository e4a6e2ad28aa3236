"""kvbm.hashing: golden vectors, an independent re-derivation of the spec, properties,
and the version 1 collision that the keyed hash removes."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.hashing import BlockHasher, HashKey, checksum

GOLDEN = Path(__file__).parent / "golden" / "hash_vectors.json"
COLLISION = Path(__file__).parent / "golden" / "xxh3_collision.json"
U32_MAX = 2**32 - 1
SECRET = b"kvbm-golden-vector-fleet-secret!"
HASHER = BlockHasher(HashKey.derive(SECRET))

tokens_st = st.lists(st.integers(0, U32_MAX), max_size=80)
block_size_st = st.integers(1, 8)


def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def lp(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def reference_key(secret: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869), extract then one expand block, written out."""
    prk = hmac.new(b"kvbm block identity", secret, hashlib.sha256).digest()
    return hmac.new(prk, b"kvbm-block-key-v2\x01", hashlib.sha256).digest()


def reference_seed(key: bytes, model: str, adapter: str = "", salt: str = "") -> int:
    h = hashlib.blake2b(
        lp(model.encode()) + lp(adapter.encode()) + lp(salt.encode()),
        digest_size=16,
        key=key,
        person=b"kvbm-seed-v2",
    )
    return int.from_bytes(h.digest(), "little")


def reference_hashes(
    key: bytes, tokens: list[int], block_size: int, parent: int, extras: dict | None = None
) -> list[int]:
    """The spec, one block at a time, with raw hashlib and struct."""
    out, prev = [], parent
    for i, start in enumerate(range(0, len(tokens) - block_size + 1, block_size)):
        block = struct.pack(f"<{block_size}I", *tokens[start : start + block_size])
        extra = (extras or {}).get(i, b"")
        data = prev.to_bytes(16, "little") + lp(extra) + block
        digest = hashlib.blake2b(data, digest_size=16, key=key, person=b"kvbm-block-v2").digest()
        prev = int.from_bytes(digest, "little")
        out.append(prev)
    return out


# --- golden vectors -------------------------------------------------------------------------


def case_hashes(case: dict) -> tuple[int, list[int]]:
    seed = HASHER.seed(case["model"], case["adapter"], case["cache_salt"])
    parent = seed if case["parent"] is None else case["parent"]
    extras = {int(i): bytes.fromhex(e) for i, e in case["extras"].items()}
    return seed, HASHER.sequence_hashes(case["tokens"], case["block_size"], parent, extras)


@pytest.mark.parametrize("case", golden()["cases"], ids=lambda c: c["name"])
def test_golden_vectors(case):
    """These vectors must never change within a hash version: nodes running different
    versions of kvbm have to agree on every hash, or a mixed fleet splits into caches
    that never share."""
    assert HASHER.key.key_id == golden()["key_id"]
    seed, hashes = case_hashes(case)
    assert seed == case["seed"]
    assert hashes == case["sequence_hashes"]


@pytest.mark.parametrize("case", golden()["cases"], ids=lambda c: c["name"])
def test_golden_vectors_match_the_reference(case):
    # the golden outputs are what the written-out spec gives, not just what the code gave once
    key = reference_key(SECRET)
    seed = reference_seed(key, case["model"], case["adapter"], case["cache_salt"])
    assert seed == case["seed"]
    parent = seed if case["parent"] is None else case["parent"]
    extras = {int(i): bytes.fromhex(e) for i, e in case["extras"].items()}
    ref = reference_hashes(key, case["tokens"], case["block_size"], parent, extras)
    assert ref == case["sequence_hashes"]


def test_golden_file_covers_the_edge_cases():
    # guard against someone trimming the file down to the easy cases
    cases = golden()["cases"]
    assert len(cases) >= 6
    assert any(c["tokens"] == [] for c in cases)
    assert any(len(c["tokens"]) % c["block_size"] for c in cases)  # a partial last block
    assert any(c["parent"] is not None for c in cases)
    assert any(max(c["tokens"], default=0) == U32_MAX for c in cases)
    assert {c["block_size"] for c in cases} >= {16, 32}
    assert any(c["adapter"] for c in cases) and any(c["cache_salt"] for c in cases)
    assert any(c["extras"] for c in cases)


# --- the key ----------------------------------------------------------------------------------


def test_the_key_is_hkdf_of_the_secret_and_its_id_is_checked():
    key = HashKey.derive(SECRET)
    assert key.key == reference_key(SECRET)
    assert HashKey.derive(SECRET + b"x").key != key.key
    assert HashKey(key.key, key.key_id) == key
    with pytest.raises(ValueError, match="id"):
        HashKey(key.key, key.key_id ^ 1)
    with pytest.raises(ValueError):
        HashKey(b"short")
    with pytest.raises(ValueError):
        HashKey.derive(b"")
    assert key.key.hex() not in repr(key)


def test_another_key_gives_other_hashes_everywhere():
    other = BlockHasher(HashKey.derive(b"another-fleet-secret-0123456789"))
    tokens = list(range(64))
    a = HASHER.sequence_hashes(tokens, 16, HASHER.seed("m"))
    b = other.sequence_hashes(tokens, 16, other.seed("m"))
    assert not set(a) & set(b)


# --- independent re-derivation --------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(tokens=tokens_st, block_size=block_size_st, parent=st.integers(0, 2**128 - 1))
def test_matches_reference_spec(tokens, block_size, parent):
    key = reference_key(SECRET)
    got = HASHER.sequence_hashes(tokens, block_size, parent)
    assert got == reference_hashes(key, tokens, block_size, parent)


def test_numpy_input_of_any_int_dtype_matches_list_input():
    seed = HASHER.seed("m")
    tokens = [0, 1, 65535, 7, 9, 11, 13, 15]
    expected = HASHER.sequence_hashes(tokens, 4, seed)
    for dtype in (np.uint16, np.int32, np.uint32, np.int64, np.uint64):
        assert HASHER.sequence_hashes(np.array(tokens, dtype=dtype), 4, seed) == expected


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(tokens=tokens_st, block_size=block_size_st, data=st.data())
def test_incremental_with_parent_equals_whole(tokens, block_size, data):
    seed = HASHER.seed("model")
    whole = HASHER.sequence_hashes(tokens, block_size, seed)
    split = data.draw(st.integers(0, len(tokens) // block_size)) * block_size
    head = HASHER.sequence_hashes(tokens[:split], block_size, seed)
    parent = head[-1] if head else seed
    tail = HASHER.sequence_hashes(tokens[split:], block_size, parent)
    assert head + tail == whole


def test_partial_tail_block_has_no_hash():
    seed = HASHER.seed("m")
    h = HASHER.sequence_hashes
    assert h(list(range(15)), 16, seed) == []
    assert h(list(range(31)), 16, seed) == h(list(range(16)), 16, seed)
    assert len(h(list(range(32)), 16, seed)) == 2
    assert h([], 16, seed) == []


def test_every_identity_input_gives_other_hashes():
    tokens = list(range(64))
    seeds = [
        HASHER.seed("model-a"),
        HASHER.seed("model-b"),
        HASHER.seed("model-a", "lora"),
        HASHER.seed("model-a", "", "user"),
        HASHER.seed("model-a", "lora", "user"),
        # length prefixes keep the fields apart: ("ab", "c") is not ("a", "bc")
        HASHER.seed("model-a", "ab", "c"),
        HASHER.seed("model-a", "a", "bc"),
    ]
    assert len(set(seeds)) == len(seeds)
    per_seed = [HASHER.sequence_hashes(tokens, 16, s) for s in seeds]
    extras = [
        HASHER.sequence_hashes(tokens, 16, seeds[0], {1: b"image-1"}),
        HASHER.sequence_hashes(tokens, 16, seeds[0], {1: b"image-2"}),
    ]
    flat = [h for hs in per_seed + extras for h in hs[1:]]
    assert len(set(flat)) == len(flat)  # no block hash is shared by any two identities
    # an extra changes its block and every block after it, not those before
    assert extras[0][0] == per_seed[0][0] and extras[0][1] != per_seed[0][1]


def test_a_block_hash_depends_on_everything_before_it():
    seed = HASHER.seed("m")
    a = HASHER.sequence_hashes([1, 2, 9, 9], 2, seed)
    b = HASHER.sequence_hashes([1, 3, 9, 9], 2, seed)
    assert a[0] != b[0] and a[1] != b[1]
    assert HASHER.sequence_hashes([1, 2], 2, seed) != HASHER.sequence_hashes([2, 1], 2, seed)


@pytest.mark.parametrize(
    "tokens",
    [[1, -1], [2**32], [U32_MAX + 5, 0], [1.0, 2.0], np.array([1.5, 2.5]), [True, False],
     ["1", "2"], [[1, 2], [3, 4]], np.zeros((2, 2), dtype=np.int64), 7],
    ids=["negative", "2**32", "above-u32", "float-list", "float-array", "bool", "str",
         "2d-list", "2d-array", "scalar"],
)  # fmt: skip
def test_bad_tokens_raise_value_error(tokens):
    with pytest.raises(ValueError):
        HASHER.sequence_hashes(tokens, 2, HASHER.seed("m"))


@pytest.mark.parametrize("block_size", [0, -16])
def test_bad_block_size_raises_value_error(block_size):
    with pytest.raises(ValueError, match="block_size"):
        HASHER.sequence_hashes([1, 2, 3], block_size, HASHER.seed("m"))


def test_bad_seed_or_model_raises_value_error():
    with pytest.raises(ValueError, match="model"):
        HASHER.seed("")
    for parent in (-1, 2**128):
        with pytest.raises(ValueError, match="parent"):
            HASHER.sequence_hashes([1, 2], 2, parent)


def test_checksum_is_xxh3_of_the_bytes():
    data = bytes(range(256)) * 3
    assert checksum(data) == xxhash.xxh3_64_intdigest(data)
    assert checksum(memoryview(data)) == checksum(data)


# --- the version 1 collision --------------------------------------------------------------------


def v1_block_hash(tokens: list[int], model_id: str) -> int:
    """Version 1's block hash, written out: xxh3_64 under a public seed."""
    parts = [b"kvbm-salt-v1", model_id.encode(), b"", b""]
    seed = xxhash.xxh3_64_intdigest(b"".join(struct.pack("<I", len(p)) + p for p in parts))
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(tokens)}I", *tokens), seed=seed)


def test_two_blocks_that_collide_in_version_1_have_different_keys_now():
    """A pair of 32-token blocks found by a collision search in CPU minutes
    (tests/unit/golden/xxh3_collision.json): in version 1 they had one key after
    any shared prefix, so one tenant's prompt loaded another's KV."""
    pair = json.loads(COLLISION.read_text())
    a, b = pair["a"], pair["b"]
    assert a != b and len(a) == len(b) == 32
    assert v1_block_hash(a, pair["model_id"]) == v1_block_hash(b, pair["model_id"])
    prefix = list(range(64))
    seed = HASHER.seed(pair["model_id"])
    ha = HASHER.sequence_hashes(prefix + a, 32, seed)
    hb = HASHER.sequence_hashes(prefix + b, 32, seed)
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
