"""Block hashes are the same in every process: Python's own hash() is salted per
process (PYTHONHASHSEED), ours must not be. (The function itself:
tests/unit/test_hashing.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.unit.test_hashing import HASHER

_CHILD = """
import json
from kvbm.hashing import BlockHasher, HashKey
h = BlockHasher(HashKey.derive(b"kvbm-golden-vector-fleet-secret!"))
seed = h.seed("meta-llama/Llama-3.1-8B-Instruct", "lora", "tenant")
print(json.dumps([seed, h.sequence_hashes(list(range(100)), 16, seed)]))
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
    seed = HASHER.seed("meta-llama/Llama-3.1-8B-Instruct", "lora", "tenant")
    assert a == b == [seed, HASHER.sequence_hashes(list(range(100)), 16, seed)]
    assert len(a[1]) == 6
