"""One vLLM (CPU) engine process for the connector tests: runs prompts given
as token ids, greedy, and prints one JSON line {"outputs": [[token ids]...]}.
Run as `python -m tests.harness.vllm_engine MODEL_DIR PROMPTS_JSON [SOCKET [REMOTE_TIERS]]`
(no SOCKET: no connector, vLLM alone); TEST_MAX_TOKENS in the environment
sets the answer's length (default 16), TEST_PREFIX_CACHING=1 turns vLLM's
own prefix cache on (off by default, so every hit is the connector's),
TEST_KV_BLOCKS=N gives vLLM a KV cache of N blocks and runs each batch at
once (so the scheduler has to preempt); the output line then also carries
vLLM's count of preemptions. With the engine core in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) the line carries "kv_cache_groups":
the kinds of vLLM's KV cache groups, as its scheduler has them.
A prompt is a list of token ids, or an object: {"tokens": [...]},
{"embeds_seed": S, "embeds_len": N} (N prompt embeddings, random from seed
S) or {"text": T, "image_seed": S} (a 56x56 random image from seed S, for
a vision model), with "cache_salt" and "lora": {"name", "id", "path"}
optional.
TEST_ENABLE_LORA=1 and TEST_PROMPT_EMBEDS=1 turn those on in vLLM;
TEST_TP=N runs the model tensor parallel over N workers;
TEST_ONE_KV_GROUP=1 turns vLLM's hybrid KV cache manager off (one KV cache
group, sliding-window layers kept whole as full attention).
PROMPTS_JSON "-": read one JSON list of prompts per stdin line and answer
each with an output line, until EOF (a test acts on the nodes between two
batches)."""

from __future__ import annotations

import json
import os
import sys


def prepare_environment() -> None:
    """What an engine sets before it imports vLLM (some of it is read at import)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    prepare_environment()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from kvbm.connector.vllm import kv_transfer_config

    model = sys.argv[1]
    prompts = "-" if sys.argv[2] == "-" else json.loads(sys.argv[2])
    transfer = None
    if len(sys.argv) > 3:
        extra = {"node": sys.argv[3]}
        if len(sys.argv) > 4 and sys.argv[4]:
            extra["remote_tiers"] = sys.argv[4].split(",")
        transfer = kv_transfer_config(extra)
    kv_blocks = int(os.environ.get("TEST_KV_BLOCKS", "0")) or None
    llm = LLM(
        model=model,
        num_gpu_blocks_override=kv_blocks,
        disable_log_stats=kv_blocks is None,
        dtype="float32",
        block_size=32,
        max_model_len=min(1024, 32 * (kv_blocks - 1)) if kv_blocks else 1024,  # one is vLLM's
        enforce_eager=True,
        enable_prefix_caching=os.environ.get("TEST_PREFIX_CACHING") == "1",
        kv_transfer_config=transfer,
        seed=0,
        enable_lora=os.environ.get("TEST_ENABLE_LORA") == "1",
        max_lora_rank=8,
        enable_prompt_embeds=os.environ.get("TEST_PROMPT_EMBEDS") == "1",
        tensor_parallel_size=int(os.environ.get("TEST_TP", "1")),
        disable_hybrid_kv_cache_manager=os.environ.get("TEST_ONE_KV_GROUP") == "1" or None,
    )
    hidden = llm.llm_engine.model_config.get_hidden_size()

    def request(p: list[int] | dict) -> tuple[dict, LoRARequest | None]:
        if isinstance(p, list):
            return TokensPrompt(prompt_token_ids=p), None
        if "image_seed" in p:
            import numpy as np
            from PIL import Image

            rng = np.random.default_rng(p["image_seed"])
            image = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
            prompt = {"prompt": p["text"], "multi_modal_data": {"image": image}}
        elif "embeds_seed" in p:
            import torch

            g = torch.Generator().manual_seed(p["embeds_seed"])
            prompt: dict = {"prompt_embeds": torch.randn(p["embeds_len"], hidden, generator=g)}
        else:
            prompt = TokensPrompt(prompt_token_ids=p["tokens"])
        if p.get("cache_salt"):
            prompt["cache_salt"] = p["cache_salt"]
        lora = p.get("lora")
        return prompt, LoRARequest(lora["name"], lora["id"], lora["path"]) if lora else None

    max_tokens = int(os.environ.get("TEST_MAX_TOKENS", "16"))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def run(batch: list[list[int]]) -> None:
        if kv_blocks:  # all at once, into a cache too small for them all
            done = llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False
            )
            outputs = [list(o.outputs[0].token_ids) for o in done]
            preempted = sum(
                int(m.value) for m in llm.get_metrics() if m.name == "vllm:num_preemptions"
            )
            print(json.dumps({"outputs": outputs, "preemptions": preempted}), flush=True)
            return
        outputs = []
        for p in batch:  # one at a time: each request's saves land before the next
            prompt, lora = request(p)
            out = llm.generate([prompt], params, use_tqdm=False, lora_request=lora)
            outputs.append(list(out[0].outputs[0].token_ids))
        print(json.dumps({"outputs": outputs, **kv_cache_groups(llm)}), flush=True)

    if prompts != "-":
        run(prompts)
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        run(json.loads(line))


def kv_cache_groups(llm: object) -> dict:
    """{"kv_cache_groups": [spec kind, ...]} where the engine core runs in
    this process, else {}."""
    core = getattr(
        getattr(getattr(llm, "llm_engine", None), "engine_core", None), "engine_core", None
    )
    config = getattr(getattr(core, "scheduler", None), "kv_cache_config", None)
    if config is None:
        return {}
    return {"kv_cache_groups": [type(g.kv_cache_spec).__name__ for g in config.kv_cache_groups]}


if __name__ == "__main__":
    main()
