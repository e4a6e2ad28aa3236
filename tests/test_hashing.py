"""kvbm.hashing: golden vectors, an independent re-derivation of the spec, and properties."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.hashing import checksum, salt_hash, sequence_hashes

GOLDEN = Path(__file__).parent / "golden" / "hash_vectors.json"
U32_MAX = 2**32 - 1

tokens_st = st.lists(st.integers(0, U32_MAX), max_size=80)
block_size_st = st.integers(1, 8)


def golden_cases() -> list[dict]:
    return json.loads(GOLDEN.read_text())["cases"]


def reference_hashes(
    tokens: list[int], block_size: int, salt: int, parent: int | None = None
) -> list[int]:
    """The spec, written out with raw xxhash and struct, one block at a time."""
    out = []
    prev = parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        block_hash = xxhash.xxh3_64_intdigest(struct.pack(f"<{len(block)}I", *block), seed=salt)
        if prev is None:
            prev = block_hash  # block 0: its own block hash
        else:
            prev = xxhash.xxh3_64_intdigest(struct.pack("<QQ", prev, block_hash), seed=salt)
        out.append(prev)
    return out


# --- golden vectors -------------------------------------------------------------------------


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_golden_vectors(case):
    """These vectors must never change: nodes running different versions of kvbm have to agree
    on every salt and sequence hash, or a mixed fleet splits into caches that never share."""
    salt = salt_hash(case["model_id"], case["lora_name"], case["user_salt"])
    assert salt == case["salt_hash"]
    hashes = sequence_hashes(case["tokens"], case["block_size"], salt, parent=case["parent"])
    assert hashes == case["sequence_hashes"]


def test_golden_file_covers_the_edge_cases():
    # guard against someone trimming the file down to the easy cases
    cases = golden_cases()
    assert len(cases) >= 6
    assert any(c["tokens"] == [] for c in cases)
    assert any(len(c["tokens"]) % c["block_size"] for c in cases)  # a partial last block
    assert any(c["parent"] is not None for c in cases)
    assert any(max(c["tokens"], default=0) == U32_MAX for c in cases)
    assert {c["block_size"] for c in cases} >= {16, 32}
    assert any(c["lora_name"] for c in cases) and any(c["user_salt"] for c in cases)


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_golden_vectors_match_the_reference(case):
    # the golden outputs are what the written-out spec gives, not just what the code gave once
    ref = reference_hashes(case["tokens"], case["block_size"], case["salt_hash"], case["parent"])
    assert ref == case["sequence_hashes"]


# --- independent re-derivation --------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(tokens=tokens_st, block_size=block_size_st, salt=st.integers(0, 2**64 - 1))
def test_matches_reference_spec(tokens, block_size, salt):
    assert sequence_hashes(tokens, block_size, salt) == reference_hashes(tokens, block_size, salt)


def test_spec_by_hand_two_blocks():
    salt = salt_hash("m")
    # block 0 = xxh3(tokens [1,2] as <u32), block 1 chains (seq0, block hash 1)
    b0 = xxhash.xxh3_64_intdigest(struct.pack("<II", 1, 2), seed=salt)
    b1 = xxhash.xxh3_64_intdigest(struct.pack("<II", 3, 4), seed=salt)
    s1 = xxhash.xxh3_64_intdigest(struct.pack("<QQ", b0, b1), seed=salt)
    assert sequence_hashes([1, 2, 3, 4], 2, salt) == [b0, s1]


def test_numpy_input_of_any_int_dtype_matches_list_input():
    salt = salt_hash("m")
    tokens = [0, 1, 65535, 7, 9, 11, 13, 15]
    expected = sequence_hashes(tokens, 4, salt)
    for dtype in (np.uint16, np.int32, np.uint32, np.int64, np.uint64):
        assert sequence_hashes(np.array(tokens, dtype=dtype), 4, salt) == expected


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(tokens=tokens_st, block_size=block_size_st, data=st.data())
def test_incremental_with_parent_equals_whole(tokens, block_size, data):
    salt = salt_hash("model")
    whole = sequence_hashes(tokens, block_size, salt)
    # split at a block boundary: hash the head, then the tail with the head's last hash as parent
    split = data.draw(st.integers(0, len(tokens) // block_size)) * block_size
    head = sequence_hashes(tokens[:split], block_size, salt)
    parent = head[-1] if head else None
    tail = sequence_hashes(tokens[split:], block_size, salt, parent=parent)
    assert head + tail == whole


@settings(max_examples=50, deadline=None)
@given(tokens=tokens_st, block_size=block_size_st, data=st.data())
def test_prefix_hashes_are_a_prefix(tokens, block_size, data):
    salt = salt_hash("model", "lora")
    whole = sequence_hashes(tokens, block_size, salt)
    n = data.draw(st.integers(0, len(tokens)))
    assert sequence_hashes(tokens[:n], block_size, salt) == whole[: n // block_size]


def test_partial_tail_block_has_no_hash():
    salt = salt_hash("m")
    # 15 tokens, block 16 -> nothing; 31 tokens -> one hash, the same as for 16 tokens
    assert sequence_hashes(list(range(15)), 16, salt) == []
    assert sequence_hashes(list(range(31)), 16, salt) == sequence_hashes(list(range(16)), 16, salt)
    assert len(sequence_hashes(list(range(32)), 16, salt)) == 2
    assert sequence_hashes([], 16, salt) == []


def test_different_salts_give_different_hashes():
    tokens = list(range(64))
    salts = [
        salt_hash("model-a"),
        salt_hash("model-b"),
        salt_hash("model-a", "lora"),
        salt_hash("model-a", None, "user"),
        salt_hash("model-a", "lora", "user"),
        # length prefixes keep the fields apart: ("ab", "c") is not ("a", "bc")
        salt_hash("model-a", "ab", "c"),
        salt_hash("model-a", "a", "bc"),
    ]
    assert len(set(salts)) == len(salts)
    per_salt = [tuple(sequence_hashes(tokens, 16, s)) for s in salts]
    assert len(set(per_salt)) == len(salts)
    # no block hash is shared between any two salts either
    flat = [h for hs in per_salt for h in hs]
    assert len(set(flat)) == len(flat)


def test_salt_is_a_u64_and_none_means_empty():
    s = salt_hash("m")
    assert 0 <= s < 2**64
    assert salt_hash("m", None, None) == salt_hash("m", "", "")


def test_a_block_hash_depends_on_everything_before_it():
    salt = salt_hash("m")
    # same second block, different first block -> different second sequence hash
    a = sequence_hashes([1, 2, 9, 9], 2, salt)
    b = sequence_hashes([1, 3, 9, 9], 2, salt)
    assert a[0] != b[0] and a[1] != b[1]
    # token order inside a block matters
    assert sequence_hashes([1, 2], 2, salt) != sequence_hashes([2, 1], 2, salt)


def test_parent_zero_is_a_parent_not_none():
    salt = salt_hash("m")
    assert sequence_hashes([1, 2], 2, salt, parent=0) != sequence_hashes([1, 2], 2, salt)
    assert sequence_hashes([1, 2], 2, salt, parent=0) == reference_hashes([1, 2], 2, salt, 0)


@pytest.mark.parametrize(
    "tokens",
    [
        [1, -1],
        [2**32],
        [U32_MAX + 5, 0],
        [1.0, 2.0],
        np.array([1.5, 2.5]),
        [True, False],
        ["1", "2"],
        [[1, 2], [3, 4]],
        np.zeros((2, 2), dtype=np.int64),
        7,
    ],
    ids=[
        "negative",
        "2**32",
        "above-u32",
        "float-list",
        "float-array",
        "bool",
        "str",
        "2d-list",
        "2d-array",
        "scalar",
    ],
)
def test_bad_tokens_raise_value_error(tokens):
    with pytest.raises(ValueError):
        sequence_hashes(tokens, 2, salt_hash("m"))


@pytest.mark.parametrize("block_size", [0, -16])
def test_bad_block_size_raises_value_error(block_size):
    with pytest.raises(ValueError, match="block_size"):
        sequence_hashes([1, 2, 3], block_size, salt_hash("m"))


def test_empty_model_id_raises_value_error():
    with pytest.raises(ValueError, match="model_id"):
        salt_hash("")


def test_checksum_is_xxh3_of_the_bytes():
    data = bytes(range(256)) * 3
    assert checksum(data) == xxhash.xxh3_64_intdigest(data)
    assert checksum(memoryview(data)) == checksum(data)


# --- determinism across processes -----------------------------------------------------------

_CHILD = """
import json
from kvbm.hashing import salt_hash, sequence_hashes
salt = salt_hash("meta-llama/Llama-3.1-8B-Instruct", "lora", "tenant")
print(json.dumps([salt, sequence_hashes(list(range(100)), 16, salt)]))
"""


def hashes_in_subprocess(hash_seed: str) -> list:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_hashes_are_the_same_in_every_process():
    # Python's own hash() is salted per process; ours must not be
    a = hashes_in_subprocess("123")
    b = hashes_in_subprocess("456")
    salt = salt_hash("meta-llama/Llama-3.1-8B-Instruct", "lora", "tenant")
    assert a == b == [salt, sequence_hashes(list(range(100)), 16, salt)]
    assert len(a[1]) == 6
