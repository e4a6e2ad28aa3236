"""The random models of `scripts/gpu-check`'s rows, built on the spot (no
downloads): small checkpoints of the shapes whose KV cache vLLM splits
otherwise than a Llama's, each with the word-level tokenizer of
kvbm/random_llama.py. Weights are drawn wide (std 0.2), as the Llama's, so
greedy outputs depend on the whole context and a wrong KV block shows.

Each is the smallest config of its architecture that keeps what vLLM keys
its KV cache on: gpt-oss's alternating full and sliding-window layers (and
their attention sinks and experts), Gemma 3's five sliding-window layers to
one full one (here three to one), Granite 4.0's Mamba2 layers beside
attention layers (dense, no experts). Every builder keeps a model already
at `path` and returns `path`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kvbm.random_llama import build_llama, save_random_model

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 1024, 256, 4, 4, 2, 64
WINDOW = 64  # tokens: a prompt of six 16-token blocks reaches past it
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}


def build_gpt_oss_like(path: str, seed: int = 0) -> str:
    """gpt-oss's shape: sliding-window and full-attention layers alternating
    (vLLM's hybrid manager makes two KV cache groups of them), attention
    sinks, 4 experts of which 2 are routed each token."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        **COMMON,
        intermediate_size=HIDDEN,
        head_dim=HEAD_DIM,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
    )
    return save_random_model(path, GptOssForCausalLM, config, seed, VOCAB)


def build_gemma3_like(path: str, seed: int = 0) -> str:
    """Gemma 3's text model: sliding-window layers with a full-attention
    layer after them (three to one here, five to one in Gemma 3). The
    output head is its own, not the embedding's (Gemma 3 ties them): tied,
    the scaled random embedding of the last token decides every answer,
    whatever the context (measured: the same token for every prompt)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **COMMON,
        intermediate_size=2 * HIDDEN,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=WINDOW,
        layer_types=["sliding_attention"] * (LAYERS - 1) + ["full_attention"],
        tie_word_embeddings=False,
    )
    return save_random_model(path, Gemma3ForCausalLM, config, seed, VOCAB)


def build_mamba_hybrid(path: str, seed: int = 0) -> str:
    """Granite 4.0's shape (transformers' GraniteMoeHybrid): Mamba2 layers
    (transformers names them "linear_attention") beside full-attention
    layers, dense (a shared MLP, no experts). vLLM keeps Mamba state in a
    KV cache group of its own."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    config = GraniteMoeHybridConfig(
        **COMMON,
        intermediate_size=2 * HIDDEN,
        shared_intermediate_size=2 * HIDDEN,
        num_local_experts=0,
        layer_types=["linear_attention", "full_attention"] * (LAYERS // 2),
        mamba_n_heads=8,  # of 64: mamba_expand (2) * hidden / 8
        mamba_d_state=64,
        mamba_chunk_size=256,
    )
    return save_random_model(path, GraniteMoeHybridForCausalLM, config, seed, VOCAB)


def build_full_attention(path: str, seed: int = 0) -> str:
    """The Llama of the first check: 4 layers of 4 KV heads of 128."""
    return build_llama(path, 4, 512, 4, 4, VOCAB, seed)


BUILDERS: dict[str, Callable[[str], str]] = {
    "llama": build_full_attention,
    "gpt-oss-like": build_gpt_oss_like,
    "gemma3-like": build_gemma3_like,
    "mamba-hybrid": build_mamba_hybrid,
}
