"""The random models of `scripts/gpu-check`'s rows (kvbm/gpu_models.py), as
far as a machine without a GPU can check them: each checkpoint loads in
transformers with every weight and no stray one, its greedy answers depend
on the prompt's first block (so a wrong KV block would show), and vLLM
reads it as the shape its row is for. A few seconds for all four."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvbm.gpu_models import BUILDERS, VOCAB, WINDOW

# what vLLM's ModelConfig must make of each: (architecture, hybrid, sliding window)
SHAPES = {
    "llama": ("LlamaForCausalLM", False, None),
    "gpt-oss-like": ("GptOssForCausalLM", False, WINDOW),
    "gemma3-like": ("Gemma3ForCausalLM", False, WINDOW),
    "mamba-hybrid": ("GraniteMoeHybridForCausalLM", True, None),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # vLLM reads local checkpoints only
    root = tmp_path_factory.mktemp("gpu-models")
    return {name: build(str(root / name)) for name, build in BUILDERS.items()}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_checkpoint_loads_whole_and_its_answers_depend_on_the_first_block(built, name):
    model, info = AutoModelForCausalLM.from_pretrained(built[name], output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched: none
    with open(os.path.join(built[name], "config.json")) as f:
        assert json.load(f)["architectures"] == [SHAPES[name][0]]
    rng = random.Random(0)
    for _ in range(4):
        p = [rng.randrange(4, VOCAB) for _ in range(97)]  # six blocks of 16 and a token
        q = [rng.randrange(4, VOCAB) for _ in range(16)] + p[16:]  # another first block
        answers = []
        for prompt in (p, q):
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
            answers.append(out[0, len(prompt) :].tolist())
        assert answers[0] != answers[1], "the answer ignores the first block"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_vllm_reads_the_shape_the_row_is_for(built, name):
    from vllm.config import ModelConfig

    config = ModelConfig(model=built[name], dtype="float32", max_model_len=1024)
    assert (config.architectures[0], config.is_hybrid, config.get_sliding_window()) == SHAPES[name]
