"""A random-weight Llama built on the spot (no downloads), for the demo,
`scripts/gpu-check`, the e2e bench and the tests: a word-level tokenizer and
weights drawn wide enough that greedy outputs depend on the whole context, so
a wrong KV block changes them; and the tokenizer and weights writer that the
other random checkpoints (tests/harness/tiny_models.py, kvbm/gpu_models.py)
share."""

from __future__ import annotations

import os
from typing import Any

# the word-level tokenizer's special tokens, in id order (bos 1, eos 2, pad 3)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def save_word_tokenizer(path: str, vocab: int = 512) -> None:
    """Write a word-level tokenizer of `vocab` ids to `path`: the specials,
    then one word per id ("w4", "w5", ...), so any id below `vocab` is a
    token. vLLM loads a model's tokenizer even when it is given token ids,
    and every random model here shares this one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    ).save_pretrained(path)


def save_random_model(
    path: str, model_class: Any, config: Any, seed: int, vocab: int, embed_std: float = 0.0
) -> str:
    """Write a transformers model of `config` with random weights (drawn
    under `seed`, in float32) and the word-level tokenizer of `vocab` ids
    to `path`; `embed_std`: the embeddings drawn again with that deviation.
    Returns `path`."""
    import torch

    save_word_tokenizer(path, vocab)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    if embed_std:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_llama(
    path: str,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    seed: int = 0,
) -> str:
    """Write the model to `path` (kept if already there); returns `path`."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    save_word_tokenizer(path, vocab)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path
