"""The `support` mark: which cell of the model support matrix a test proves,
and how. docs/models.md's matrix is generated from these marks
(tests/harness/support_matrix.py), so a test that proves a cell says so
where it stands, and the docs cannot claim a cell no test proves.

    @pytest.mark.support("sliding-window", "hits", "vllm-objects")
    @pytest.mark.support("mamba-hybrid", "hits", "vllm-objects", refused="mamba-state")

A cell is an architecture (a row of the matrix) and a feature (a column);
the proof is how far the test goes (PROOFS); `refused` says that the test
proves kvbm refuses the cell, and why (a key of REFUSALS). The mark may sit
on a test function, in a module's `pytestmark`, or in `pytest.param(...,
marks=...)` of a parametrized test (the cell is then that case's). Its
arguments are literals: the marks are read from the source without
importing the tests (`read_marks`), so the unit tier regenerates the matrix
without vLLM; anything else is an error naming the line, as is a word
outside the vocabulary below."""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

# The matrix's rows, in its order: an architecture or a shape of its KV cache.
ARCHITECTURES = {
    "full-attention": "Llama-style full attention",
    "mla": "MLA (DeepSeek's latent attention)",
    "sliding-window": "Sliding window, one KV cache group",
    "chunked-local": "Chunked local attention, one group (Llama 4)",
    "window-as-full": "Sliding window kept as full attention (the hybrid manager off)",
    "full-and-sliding": "Full and sliding-window groups (gpt-oss, Gemma 2 and 3)",
    "mamba-hybrid": "Mamba or linear-attention layers (Granite 4.0, Qwen3-Next, Jamba)",
    "fp8-kv": "fp8 KV cache (e4m3, e5m2)",
    "quantized-kv": "Packed or per-token-head quantized KV cache",
    "tensor-parallel": "Tensor parallel",
    "pipeline-parallel": "Pipeline parallel",
    "context-parallel": "Decode or prefill context parallel",
}
# The matrix's columns: what is proven of the architecture.
FEATURES = {
    "shape": "shape read",  # the connector's geometry of vLLM's KV cache, or its refusal
    "bytes": "bytes bit-exact",  # blocks copied to the node and back in vLLM's own allocation
    "hits": "saved and loaded",  # an engine's blocks saved, a later request's hit loaded
    "remote": "pulled from a peer",  # a hit loaded from another node's tiers
    "outputs": "outputs equal vLLM alone",  # greedy answers, compared token by token
}
# How far a test goes, strongest first.
PROOFS = {
    "vllm-cpu": "real vLLM on CPU",  # engines in processes of their own, a model run
    "vllm-objects": "vLLM's objects in process",  # its scheduler, allocator or specs; no model
    "gpu-check": "GPU check",  # scripts/gpu-check (kvbm/gpu_rows.py): needs a GPU
}
# Why kvbm refuses a cell (a mark's `refused=`), in the docs' words; the
# code's own messages are in kvbm/connector/vllm/engine_setup.py.
REFUSALS = {
    "head-shapes": "KV cache groups of different head shapes (a slot holds every group's "
    "layers), so kvbm turns itself off and vLLM runs on",
    "mamba-state": "Mamba or linear-attention state is not KV blocks, so kvbm turns itself "
    "off and vLLM runs on (with no one-group way: vLLM needs its hybrid manager for the state)",
    "per-token-head": "a per-token-head quantized cache whose pages vLLM does not pack "
    "(scales apart from the data) is not stored",
    "packed-pages": "packed pages of other modes than per-token-head (NVFP4, TurboQuant) are "
    "not stored yet",
    "context-parallel": "prefill context parallelism is not stored yet (decode context "
    "parallelism is)",
    "mla-on-cpu": "vLLM's CPU MLA backend computes over a cached prefix otherwise than over "
    "the whole prompt (vLLM turns its own prefix cache off for it), so kvbm stores no MLA "
    "cache on CPU",
}
MARK = "support"
TIERS = ("unit", "integration", "system")


@dataclass(frozen=True)
class Cell:
    """A cell of the matrix as one test proves it.

    Invariant: every word is in its vocabulary (`refused`, when given,
    in REFUSALS)."""

    architecture: str
    feature: str
    proof: str
    refused: str | None = None

    def __post_init__(self) -> None:
        words = [
            (self.architecture, ARCHITECTURES),
            (self.feature, FEATURES),
            (self.proof, PROOFS),
        ]
        if self.refused is not None:
            words.append((self.refused, REFUSALS))
        for word, known in words:
            if word not in known:
                raise ValueError(f"{word!r} is not one of {', '.join(known)}")

    @property
    def reason(self) -> str | None:
        """Why kvbm refuses the cell, in words (None: it does not)."""
        return REFUSALS[self.refused] if self.refused else None


@dataclass(frozen=True)
class Proven:
    """A cell and the test that proves it (`tests/<tier>/<file>::<name>`, or
    a `scripts/gpu-check` row with where and when it last ran and held)."""

    cell: Cell
    test: str
    ran: str | None = None


def read_marks(root: pathlib.Path) -> list[Proven]:
    """Every support mark of the test tiers under `root`, in file order."""
    found: list[Proven] = []
    for tier in TIERS:
        for path in sorted((root / "tests" / tier).rglob("test_*.py")):
            found += marks_in(path.read_text(), path.relative_to(root).as_posix())
    return found


def marks_in(source: str, name: str) -> list[Proven]:
    """The support marks of one test module's source (`name` its path)."""
    tree = ast.parse(source)
    found: list[Proven] = []
    seen: set[int] = set()  # the marks read, by id: every one in the module must be

    def cells(node: ast.expr) -> list[Cell]:
        made = []
        for item in _elements(node):
            if _is_support(item):
                seen.add(id(item.func))
                made.append(_cell(item, name))
        return made

    module: list[Cell] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            module += cells(node.value)
    lists = {  # module-level lists a parametrize may name (ROWS = [pytest.param(...), ...])
        t.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    for owner, test in _tests(tree):
        own = [c for d in [*owner, *test.decorator_list] for c in cells(d)]
        for c in module + own:
            found.append(Proven(c, f"{name}::{test.name}"))
        for case, marks in _params(test, name, lists):
            found += [Proven(c, f"{name}::{test.name}[{case}]") for c in cells(marks)]
    for node in ast.walk(tree):
        if _is_support_attr(node) and id(node) not in seen:
            raise ValueError(
                f"{name}:{node.lineno}: a support mark the matrix cannot read; put it on a "
                "test function, in pytestmark or in pytest.param(marks=...)"
            )
    return found


def _tests(tree: ast.Module) -> list[tuple[list[ast.expr], ast.FunctionDef]]:
    """The module's test functions, each with its class's decorators."""
    tests = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name.startswith("test"):
                tests.append(([], node))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            tests += [
                (node.decorator_list, item)
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                and item.name.startswith("test")
            ]
    return tests


def _params(
    test: ast.FunctionDef, name: str, lists: dict[str, ast.expr]
) -> list[tuple[str, ast.expr]]:
    """(id, marks) of each `pytest.param(..., id=..., marks=...)` in the
    test's parametrize decorators, written there or in a module-level list
    they name."""
    out = []
    for dec in test.decorator_list:
        if not (isinstance(dec, ast.Call) and _attr_name(dec.func) == "parametrize"):
            continue
        values = dec.args[1] if len(dec.args) > 1 else None
        for kw in dec.keywords:
            if kw.arg == "argvalues":
                values = kw.value
        if isinstance(values, ast.Name):
            values = lists.get(values.id)
        for param in getattr(values, "elts", []):
            if not (isinstance(param, ast.Call) and _attr_name(param.func) == "param"):
                continue
            kws = {kw.arg: kw.value for kw in param.keywords}
            if not any(_is_support(m) for m in _elements(kws.get("marks"))):
                continue
            if not isinstance(kws.get("id"), ast.Constant):
                raise ValueError(
                    f"{name}:{param.lineno}: a marked pytest.param needs a literal id="
                )
            out.append((str(kws["id"].value), kws["marks"]))
    return out


def _elements(node: ast.expr | None) -> list[ast.expr]:
    """A mark or a list of marks, as a list."""
    if node is None:
        return []
    return list(node.elts) if isinstance(node, (ast.List, ast.Tuple)) else [node]


def _attr_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else ""


def _is_support_attr(node: ast.AST) -> bool:
    """`pytest.mark.support` or `mark.support`, called or not."""
    if not isinstance(node, ast.Attribute) or node.attr != MARK:
        return False
    owner = node.value
    return _attr_name(owner) == "mark" or (isinstance(owner, ast.Name) and owner.id == "mark")


def _is_support(node: ast.AST) -> bool:
    """`pytest.mark.support(...)` or `mark.support(...)`."""
    return isinstance(node, ast.Call) and _is_support_attr(node.func)


def _cell(call: ast.Call, name: str) -> Cell:
    try:
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        if len(kwargs) != len(call.keywords):
            raise ValueError("no **kwargs")
        return Cell(*args, **kwargs)  # the mark's signature is the cell's
    except (ValueError, TypeError, SyntaxError) as e:
        raise ValueError(f"{name}:{call.lineno}: support mark: {e}") from e
