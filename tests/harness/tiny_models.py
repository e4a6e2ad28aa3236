"""Tiny random checkpoints of other architectures than the tests' Llama, built
on the spot with transformers (no downloads), with the same word-level
tokenizer (kvbm/random_llama.py) and weights drawn as wide, so that greedy
outputs depend on the context:

- Gemma 2: sliding-window layers alternating with full-attention ones;
- a Mistral whose every layer has a sliding window (vLLM: one KV cache
  group of sliding-window attention);
- a DeepSeek-V2 with multi-head latent attention (MLA), dense (no experts).

Each is kept if already built. The windows are small (WINDOW tokens) so
that a prompt of a few blocks reaches past them."""

from __future__ import annotations

import os
from typing import Any

from kvbm.random_llama import save_random_model

WINDOW = 64  # tokens in a sliding window, two of the tests' 32-token blocks
VOCAB = 512
# what every model here shares: the tokenizer's ids, wide random weights
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "torch_dtype": "float32",
}


def _built(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def build_gemma2(path: str, seed: int = 0) -> str:
    """Gemma 2 of 2 layers (the first with a WINDOW-token sliding window, the
    second full attention), hidden 128, 4 heads, 2 KV heads of 32, with
    Gemma's logit soft-capping. Gemma scales its embeddings by sqrt(hidden)
    and ties them to the output: drawn as wide as the other weights, they
    swamp the residual stream and every prompt answers one token over and
    over; drawn sqrt(hidden) times narrower, the answer depends on tokens
    past the window (measured with transformers)."""
    if _built(path):
        return path
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        **COMMON,
    )
    return save_random_model(path, Gemma2ForCausalLM, config, seed, VOCAB, embed_std=0.2 / 128**0.5)


def build_mistral_window(path: str, seed: int = 0) -> str:
    """A Mistral of 2 layers, both with a WINDOW-token sliding window, hidden
    128, 4 heads, 2 KV heads of 32."""
    if _built(path):
        return path
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=WINDOW,
        **COMMON,
    )
    return save_random_model(path, MistralForCausalLM, config, seed, VOCAB)


def build_deepseek_mla(path: str, seed: int = 0) -> str:
    """A dense DeepSeek-V2 of 2 layers with MLA, hidden 128, 4 heads. The
    latent is 512 + 64 wide because vLLM's CPU MLA kernel knows only that
    size (a cached token is 576 values per layer, one "head")."""
    if _built(path):
        return path
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        first_k_dense_replace=2,  # every layer dense: no experts
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        **COMMON,
    )
    return save_random_model(path, DeepseekV2ForCausalLM, config, seed, VOCAB)
