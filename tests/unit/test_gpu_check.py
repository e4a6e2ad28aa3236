"""What of `scripts/gpu-check` runs without a GPU: its rows listed (without
torch or vLLM, as on a machine with neither), the choice of rows, each
row's vLLM arguments, and how answers are compared. The rows themselves
need a GPU (docs/models.md#gpu-checks)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from kvbm import gpu_check
from kvbm.gpu_models import BUILDERS
from kvbm.gpu_rows import ROWS, Expect

ROOT = pathlib.Path(__file__).resolve().parents[2]


def listed(capsys, *argv: str) -> list[dict]:
    assert gpu_check.main(["--list", *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_list_prints_every_row_without_torch_or_vllm():
    code = (
        "import sys; from kvbm.gpu_check import main; main(['--list']); "
        "assert not {'torch', 'vllm', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["row"] for r in rows] == [r.name for r in ROWS]
    assert all(r["ran"] is None for r in rows)  # nothing has run on a GPU yet


def test_rows_are_picked_by_name_in_the_tables_order(capsys):
    rows = listed(capsys, "--row", "mamba-hybrid", "--row", "llama")
    assert [r["row"] for r in rows] == ["llama", "mamba-hybrid"]
    assert rows[1]["expect"] == "off" and rows[0]["expect"] == "served"


def test_an_unknown_row_is_refused_naming_the_rows(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--list", "--row", "llama3"])
    assert e.value.code == 2
    assert "no gpu-check row llama3; rows: fp8-kv, gemma3-like" in capsys.readouterr().err


def test_each_row_builds_a_known_model_with_its_own_vllm_arguments():
    assert {r.model for r in ROWS} <= set(BUILDERS)
    args = {r.name: gpu_check.llm_args(r, "float32") for r in ROWS}
    assert args["fp8-kv"]["kv_cache_dtype"] == "fp8"
    assert args["gemma3-like-one-group"]["disable_hybrid_kv_cache_manager"] is True
    assert "disable_hybrid_kv_cache_manager" not in args["gemma3-like"]  # vLLM's default: on
    assert all(
        a["dtype"] == "float32" and a["block_size"] == gpu_check.BLOCK for a in args.values()
    )
    # a row kvbm serves proves it stores, pulls and answers; one it is off for, that vLLM runs on
    for r in ROWS:
        features = {feature for _, feature in r.cells}
        want = {"hits", "remote", "outputs"} if r.expect is Expect.SERVED else {"outputs"}
        assert features == want, r.name


def test_answers_are_compared_token_by_token():
    reference = [[1] * gpu_check.ANSWER, [2] * gpu_check.ANSWER]
    flipped = [[1] * gpu_check.ANSWER, [2] * (gpu_check.ANSWER - 4) + [3] * 4]
    assert gpu_check.compare([reference, reference], reference) == {
        "outputs_identical": True,
        "equal_token_fraction": 1.0,
    }
    assert gpu_check.compare([reference, flipped], reference) == {
        "outputs_identical": False,
        "equal_token_fraction": round(1 - 4 / (4 * gpu_check.ANSWER), 3),
    }


def test_the_prompts_are_whole_blocks_and_one_token():
    prompts = gpu_check.prompts()
    assert len(prompts) == gpu_check.PROMPTS
    assert all(len(p) == gpu_check.BLOCKS_PER_PROMPT * gpu_check.BLOCK + 1 for p in prompts)
    assert all(4 <= t < gpu_check.VOCAB for p in prompts for t in p)  # no special token
    assert prompts == gpu_check.prompts()  # the same every run
