"""What a request's KV depends on besides its token ids, as the block hash
takes it (kvbm/hashing.py): the checkpoint, the LoRA adapter, the cache salt,
and, block by block, the multimodal features and prompt-embedding bytes in
the block. The fields are those vLLM's own block hash covers
(vllm/v1/core/kv_cache_utils.py `generate_block_hash_extra_keys`), read from
the same request attributes.

A name is not an identity: two checkpoints served under one name, or a LoRA
name pointed at another adapter, compute different KV. So a local checkpoint
or adapter is named by its path and a digest of its files (config bytes;
each weight file's name, size, and its first and last MiB, where random and
trained weights differ), taken once per process. Not every byte is read
(a checkpoint can be hundreds of GB), so weights rewritten in place with
changes only inside their files, sizes kept, keep the identity: roll a new
checkpoint out under a new path or revision. The path is part of the
identity, so nodes share a checkpoint's blocks when they mount it at one
path (as a DaemonSet's volume does). A hub name is taken as given with its
revision: pin revisions in a fleet.

A request with an input this module cannot name (a multimodal feature
without an identifier, say) gets no identity: it is neither looked up nor
saved, and counted, never guessed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvbm.hashing import BlockHasher

log = logging.getLogger("kvbm.connector")

_EDGE = 1 << 20  # bytes read from each end of a weight file
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIGS = ("config.json", "adapter_config.json", "generation_config.json")
_LEN = struct.Struct("<I")


def model_identity(model_config: Any, parallel_config: Any = None) -> str:
    """The checkpoint a vLLM engine serves (its ModelConfig), for block keys.
    Under decode context parallelism a rank's block holds every n-th token
    (n ranks, in runs of the interleave size) of a block n times as long:
    other bytes under the same geometry, so n and the interleave are part
    of the identity (appended, so the identity of every other engine is
    what it was)."""
    mc = model_config
    overrides = getattr(mc, "hf_overrides", None)
    if callable(overrides):
        raise Unnameable("hf_overrides given as a function: its effect cannot be named")
    identity = checkpoint_identity(
        str(mc.model),
        getattr(mc, "revision", None),
        dtype=str(getattr(mc, "dtype", "")).removeprefix("torch."),
        quantization=getattr(mc, "quantization", None) or "",
        overrides=json.dumps(overrides, sort_keys=True, default=str) if overrides else "",
    )
    dcp = getattr(parallel_config, "decode_context_parallel_size", 1)
    if dcp > 1:
        interleave = getattr(parallel_config, "cp_kv_cache_interleave_size", 1)
        identity += f"\0dcp={dcp},interleave={interleave}"
    return identity


@dataclass(frozen=True)
class PromptHashes:
    seed: int
    hashes: list[int]  # of the prompt's full blocks
    extras: dict[int, bytes]  # every block's extras, for the blocks generation completes


def prompt_hashes(hasher: BlockHasher, model: str, request: Any, block_size: int) -> PromptHashes:
    """A vLLM request's seed and prompt block hashes; Unnameable for an input
    the hash cannot name."""
    ident = request_identity(request, block_size)
    seed = hasher.seed(model, ident.adapter, ident.cache_salt)
    tokens = prompt_tokens(request)
    return PromptHashes(
        seed, hasher.sequence_hashes(tokens, block_size, seed, ident.extras), ident.extras
    )


class Unnameable(ValueError):
    """A request input the block hash cannot name: no cache for the request."""


@dataclass(frozen=True)
class RequestIdentity:
    """A request's seed inputs, and each prompt block's extras (absent: none)."""

    adapter: str = ""
    cache_salt: str = ""
    extras: dict[int, bytes] = field(default_factory=dict)


def _lp(part: str | bytes) -> bytes:
    raw = part.encode() if isinstance(part, str) else bytes(part)
    return _LEN.pack(len(raw)) + raw


def request_identity(request: Any, block_size: int) -> RequestIdentity:
    """The identity of a vLLM request; Unnameable for an input it cannot name."""
    lora = getattr(request, "lora_request", None)
    salt = getattr(request, "cache_salt", None) or ""
    if not isinstance(salt, str):
        raise Unnameable("a cache_salt that is not a string")
    tokens = len(prompt_tokens(request))
    extras: dict[int, list[bytes]] = {}
    for start, length, identifier in _mm_spans(getattr(request, "mm_features", None)):
        first, last = start // block_size, (start + length - 1) // block_size
        for b in range(first, last + 1):
            # the feature's offset from the block's start, as vLLM keys it
            extras.setdefault(b, []).append(
                _lp("mm") + _lp(identifier) + _lp(str(start - b * block_size))
            )
    embeds = getattr(request, "prompt_embeds", None)
    if embeds is not None:
        for b, digest in enumerate(_embed_digests(embeds, tokens, block_size)):
            extras.setdefault(b, []).append(_lp("embeds") + _lp(digest))
    return RequestIdentity(
        adapter_identity(lora) if lora else "",
        salt,
        {b: b"".join(parts) for b, parts in extras.items()},
    )


def prompt_tokens(request: Any) -> list[int]:
    """The prompt's token ids as the engine runs them: where prompt
    embeddings stand in for tokens, vLLM holds 0 (their bytes are the
    blocks' extras)."""
    n = getattr(request, "num_prompt_tokens", None)
    if n is None:
        return list(getattr(request, "prompt_token_ids", None) or [])
    return list(request.all_token_ids[:n])


def _mm_spans(features: Iterable[Any] | None) -> list[tuple[int, int, str]]:
    spans = []
    for f in features or ():
        identifier = getattr(f, "identifier", None)
        pos = getattr(f, "mm_position", None)
        if not isinstance(identifier, str) or not identifier or pos is None:
            raise Unnameable("a multimodal input without an identifier")
        offset, length = getattr(pos, "offset", None), getattr(pos, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0:
            raise Unnameable("a multimodal input without a position")
        spans.append((offset, length, identifier))
    return spans


def _embed_digests(embeds: Any, tokens: int, block_size: int) -> list[bytes]:
    """SHA-256 of each full block's prompt-embedding bytes (dtype and shape
    included, so the same bytes read as another tensor differ)."""
    try:
        import torch

        rows = embeds.detach().to("cpu").contiguous()
        if rows.ndim != 2:
            raise Unnameable("prompt embeddings that are not one row per token")
        out = []
        n = min(len(rows), tokens or len(rows))
        for b in range(-(-n // block_size)):  # a partial last block too: generated tokens fill it
            part = rows[b * block_size : min(n, (b + 1) * block_size)]
            head = f"{part.dtype}:{tuple(part.shape)}".encode()
            data = part.view(torch.uint8).numpy().tobytes()
            out.append(hashlib.sha256(_lp(head) + data).digest())
        return out
    except (AttributeError, RuntimeError, TypeError) as e:
        raise Unnameable(f"prompt embeddings that cannot be read: {e}") from None


def adapter_identity(lora: Any) -> str:
    """A LoRA adapter's name, id and path, and a digest of its files when
    the path is a local directory."""
    name = getattr(lora, "lora_name", None)
    path = getattr(lora, "lora_path", None) or ""
    int_id = getattr(lora, "lora_int_id", 0)
    if not isinstance(name, str) or not isinstance(path, str):
        raise Unnameable("a LoRA adapter without a name and a path")
    return "\0".join(["lora", name, str(int_id), path, files_digest(path)])


def checkpoint_identity(
    model: str,
    revision: str | None = None,
    *,
    dtype: str = "",
    quantization: str = "",
    overrides: str = "",
) -> str:
    """The model's identity: its name or path, its revision, the settings
    that change its KV for given weights (dtype, quantization, config
    overrides as JSON), and a digest of its files when local."""
    parts = ["model", model, revision or "", dtype, quantization, overrides, files_digest(model)]
    return "\0".join(parts)


def files_digest(path: str) -> str:
    """A digest of a local checkpoint or adapter directory ("" for anything
    else: a hub name). Cached per directory and its files' mtimes."""
    if not path or not os.path.isdir(path):
        return ""
    try:
        names = sorted(n for n in os.listdir(path) if n in _CONFIGS or n.endswith(_WEIGHTS))
        stamp = tuple((n, os.stat(os.path.join(path, n)).st_mtime_ns) for n in names)
        return _digest(os.path.realpath(path), stamp)
    except OSError as e:
        raise Unnameable(f"cannot read {path}: {e}") from None


@functools.lru_cache(maxsize=64)
def _digest(path: str, stamp: tuple[tuple[str, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _ in stamp:
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        h.update(_lp(name) + struct.pack("<Q", size))
        with open(file, "rb") as f:
            if name in _CONFIGS:
                h.update(_lp(f.read()))
                continue
            if size <= 2 * _EDGE:
                h.update(_lp(f.read()))
                continue
            h.update(_lp(f.read(_EDGE)))
            f.seek(size - _EDGE)
            h.update(_lp(f.read(_EDGE)))
    log.debug("files digest taken path=%s files=%d", path, len(stamp))
    return h.hexdigest()
