"""kvbm/connector/identity.py on its own: what of a request goes into its
block keys, block by block (the real-vLLM proof is tests/system/test_vllm_identity.py).
Requests here are plain objects with the attributes vLLM's Request has."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kvbm.connector.identity import (
    Unnameable,
    adapter_identity,
    checkpoint_identity,
    model_identity,
    prompt_hashes,
    request_identity,
)
from kvbm.hashing import BlockHasher, HashKey

HASHER = BlockHasher(HashKey.derive(b"identity-test-fleet-secret-01234"))


def request(n: int = 100, **fields) -> SimpleNamespace:
    tokens = [5] * n
    base = {
        "prompt_token_ids": tokens,
        "num_prompt_tokens": n,
        "all_token_ids": tokens,
        "mm_features": None,
        "prompt_embeds": None,
        "lora_request": None,
        "cache_salt": None,
    }
    return SimpleNamespace(**{**base, **fields})


def image(identifier: str | None, offset: int, length: int) -> SimpleNamespace:
    return SimpleNamespace(
        identifier=identifier, mm_position=SimpleNamespace(offset=offset, length=length)
    )


def test_an_image_is_an_extra_of_every_block_it_overlaps_at_its_offset():
    ident = request_identity(request(mm_features=[image("img-a", 40, 40)]), 32)
    assert sorted(ident.extras) == [1, 2]  # tokens 40..79: blocks 1 and 2
    other = request_identity(request(mm_features=[image("img-b", 40, 40)]), 32)
    moved = request_identity(request(mm_features=[image("img-a", 41, 40)]), 32)
    assert ident.extras[1] != other.extras[1] != moved.extras[1]
    a = prompt_hashes(HASHER, "m", request(mm_features=[image("img-a", 40, 40)]), 32)
    b = prompt_hashes(HASHER, "m", request(mm_features=[image("img-b", 40, 40)]), 32)
    plain = prompt_hashes(HASHER, "m", request(), 32)
    assert a.hashes[0] == b.hashes[0] == plain.hashes[0]  # block 0 holds no image
    assert a.hashes[1] != b.hashes[1] and a.hashes[2] != b.hashes[2] != plain.hashes[2]


@pytest.mark.parametrize(
    "feature", [image(None, 0, 4), image("", 0, 4), image("x", -1, 4), image("x", 0, 0)]
)
def test_a_multimodal_input_without_a_name_or_a_place_is_unnameable(feature):
    with pytest.raises(Unnameable):
        request_identity(request(mm_features=[feature]), 32)


def test_prompt_embeddings_are_each_blocks_extras_the_partial_last_one_included():
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(70, 8, generator=g)
    r = request(70, prompt_token_ids=None, all_token_ids=[0] * 70, prompt_embeds=embeds)
    ident = request_identity(r, 32)
    assert sorted(ident.extras) == [0, 1, 2]  # 70 positions: blocks 0, 1 and the partial 2
    changed = embeds.clone()
    changed[33, 0] += 1.0  # one value in block 1
    other = request_identity(request(70, prompt_embeds=changed), 32)
    assert other.extras[0] == ident.extras[0] and other.extras[1] != ident.extras[1]
    as_half = request_identity(request(70, prompt_embeds=embeds.to(torch.float16)), 32)
    assert as_half.extras[0] != ident.extras[0]
    hashed = prompt_hashes(HASHER, "m", r, 32)
    assert len(hashed.hashes) == 2 and hashed.extras == ident.extras
    tokens_zero = prompt_hashes(HASHER, "m", request(70, all_token_ids=[0] * 70), 32)
    assert not set(hashed.hashes) & set(tokens_zero.hashes)


def test_a_lora_is_its_name_id_path_and_files(tmp_path):
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(os.urandom(3 << 20))
    lora = SimpleNamespace(lora_name="sql", lora_int_id=1, lora_path=str(path))
    first = adapter_identity(lora)
    assert first == adapter_identity(lora)
    assert (
        adapter_identity(SimpleNamespace(lora_name="chat", lora_int_id=1, lora_path=str(path)))
        != first
    )
    (path / "adapter_model.safetensors").write_bytes(os.urandom(3 << 20))  # retrained in place
    assert adapter_identity(lora) != first
    ident = request_identity(request(lora_request=lora), 32)
    assert ident.adapter == adapter_identity(lora) and not ident.extras
    with pytest.raises(Unnameable):
        adapter_identity(SimpleNamespace(lora_name=None, lora_int_id=1, lora_path=""))


def test_a_checkpoint_is_its_path_settings_and_files(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "model.safetensors").write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    first = checkpoint_identity(str(path), dtype="float32")
    assert first == checkpoint_identity(str(path), dtype="float32")
    assert first != checkpoint_identity(str(path), dtype="bfloat16")
    assert first != checkpoint_identity(str(path), "v2", dtype="float32")
    # other weights, same config and size (only the last MiB differs)
    with open(path / "model.safetensors", "r+b") as f:
        f.seek((4 << 20) - 10)
        f.write(b"x" * 10)
    assert checkpoint_identity(str(path), dtype="float32") != first
    config = SimpleNamespace(model=str(path), revision=None, dtype=torch.float32,
                             quantization=None, hf_overrides={})  # fmt: skip
    assert model_identity(config) == checkpoint_identity(str(path), dtype="float32")
    with pytest.raises(Unnameable):
        model_identity(SimpleNamespace(**{**vars(config), "hf_overrides": lambda c: c}))
    hub = checkpoint_identity("org/model", "abc123")
    assert hub.endswith("\0")  # a hub name: no files to digest here


def test_salts_and_adapters_seed_differently():
    plain = prompt_hashes(HASHER, "m", request(), 32)
    salted = prompt_hashes(HASHER, "m", request(cache_salt="t1"), 32)
    assert plain.seed != salted.seed and not set(plain.hashes) & set(salted.hashes)
    with pytest.raises(Unnameable):
        request_identity(request(cache_salt=b"bytes"), 32)


def test_decode_context_parallel_ranks_and_interleave_are_in_the_identity(tmp_path):
    """A DCP rank's block holds every n-th token (runs of the interleave):
    other bytes under the same geometry for another n or interleave. Without
    DCP the identity is what it always was."""
    config = SimpleNamespace(model=str(tmp_path), revision=None, dtype="float32")
    plain = model_identity(config)
    assert model_identity(config, SimpleNamespace(decode_context_parallel_size=1)) == plain
    seen = {plain}
    for dcp, interleave in ((2, 1), (4, 1), (2, 16)):
        pc = SimpleNamespace(
            decode_context_parallel_size=dcp, cp_kv_cache_interleave_size=interleave
        )
        seen.add(model_identity(config, pc))
    assert len(seen) == 4
