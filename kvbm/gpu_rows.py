"""The rows of `scripts/gpu-check`: for each, the random model it builds
(kvbm/gpu_models.py), the vLLM arguments it adds, and what must hold. Plain
data without torch or vLLM, so `scripts/gpu-check --list` prints the plan on
a machine without a GPU, and docs/models.md's support matrix shows each row
as a GPU check (with `ran`, once one has)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Expect(enum.Enum):
    """What a row checks."""

    # vLLM alone answers (the reference); engine 1 on node A computes and
    # saves; engine 2 on node B loads from A's host tier, then from its own;
    # every answer equals the reference (fp32), every block counted.
    SERVED = "served"
    # vLLM alone answers; an engine with kvbm configured (node A named)
    # starts, kvbm turns itself off for the model, the engine answers the
    # same, the node shows the refusal (`kvbm status`) and holds no block.
    OFF = "off"


@dataclass(frozen=True)
class GpuRow:
    """One row. `cells`: the (architecture, feature) cells of the support
    matrix it would prove (tests/harness/support_marks.py names them);
    `ran`: where and when it last ran and held, None until it has."""

    name: str
    model: str  # a key of kvbm.gpu_models.BUILDERS
    expect: Expect
    about: str
    vllm_args: tuple[tuple[str, Any], ...] = ()
    cells: tuple[tuple[str, str], ...] = ()
    ran: str | None = None

    def plan(self) -> dict[str, Any]:
        """The row as `--list` prints it."""
        return {
            "row": self.name,
            "model": self.model,
            "expect": self.expect.value,
            "vllm_args": dict(self.vllm_args),
            "about": self.about,
            "ran": self.ran,
        }


SERVED_CELLS = ("hits", "remote", "outputs")
ONE_GROUP = (("disable_hybrid_kv_cache_manager", True),)

ROWS: tuple[GpuRow, ...] = (
    GpuRow(
        "llama",
        "llama",
        Expect.SERVED,
        "Full attention; engine 2 on node B loads engine 1's prompts from node A.",
        cells=tuple(("full-attention", f) for f in SERVED_CELLS),
    ),
    GpuRow(
        "fp8-kv",
        "llama",
        Expect.SERVED,
        "The Llama with an fp8 (e4m3) KV cache, stored one byte an element.",
        vllm_args=(("kv_cache_dtype", "fp8"),),
        cells=tuple(("fp8-kv", f) for f in SERVED_CELLS),
    ),
    GpuRow(
        "int8-per-token-head-kv",
        "llama",
        Expect.SERVED,
        "The Llama with an int8 per-token-head KV cache: pages of int8 K and V with their "
        "fp32 scales inline, stored as bytes (Triton attention).",
        vllm_args=(("kv_cache_dtype", "int8_per_token_head"),),
        cells=tuple(("quantized-kv", f) for f in SERVED_CELLS),
    ),
    GpuRow(
        "gpt-oss-like",
        "gpt-oss-like",
        Expect.SERVED,
        "Full and sliding-window layers, which vLLM's hybrid manager puts in two KV cache "
        "groups (kvbm declares SupportsHMA, so vLLM keeps the manager); a slot holds both.",
        cells=tuple(("full-and-sliding", f) for f in SERVED_CELLS),
    ),
    GpuRow(
        "gpt-oss-like-one-group",
        "gpt-oss-like",
        Expect.SERVED,
        "The same model with the hybrid manager off, one group of full attention that "
        "keeps every block.",
        vllm_args=ONE_GROUP,
        cells=tuple(("window-as-full", f) for f in SERVED_CELLS),
    ),
    GpuRow(
        "gemma3-like",
        "gemma3-like",
        Expect.SERVED,
        "Three sliding-window layers to one full, several KV cache groups.",
        cells=tuple(("full-and-sliding", f) for f in SERVED_CELLS),
    ),
    GpuRow(
        "gemma3-like-one-group",
        "gemma3-like",
        Expect.SERVED,
        "The same model with the hybrid manager off, one group.",
        vllm_args=ONE_GROUP,
        cells=tuple(("window-as-full", f) for f in SERVED_CELLS),
    ),
    GpuRow(
        "mamba-hybrid",
        "mamba-hybrid",
        Expect.OFF,
        "Mamba2 layers beside attention layers (Granite 4.0-like), their state a group of "
        "its own (vLLM widens the attention blocks to the state's page size).",
        cells=(("mamba-hybrid", "outputs"),),
    ),
)


def rows_named(names: list[str] | None) -> list[GpuRow]:
    """The rows to run, in ROWS' order (every row for None or []).
    ValueError names an unknown row."""
    known = {r.name for r in ROWS}
    unknown = sorted(set(names or []) - known)
    if unknown:
        raise ValueError(f"no gpu-check row {', '.join(unknown)}; rows: {', '.join(sorted(known))}")
    return [r for r in ROWS if not names or r.name in names]
