"""docs/models.md's support matrix is what the tests' support marks say
(regenerated and compared), and the marks are read as pytest reads them:
on functions, in pytestmark, in one case of a parametrized test, never
silently missed."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from kvbm import gpu_rows
from kvbm.gpu_rows import ROWS
from tests.harness import support_matrix
from tests.harness.support_marks import ARCHITECTURES, REFUSALS, Cell, Proven, marks_in
from tests.harness.support_matrix import (
    DOC,
    current,
    gpu_proofs,
    grid,
    reasons,
    replaced,
    stored,
)


def read(source: str) -> list[tuple[str, str, str, str, str | None]]:
    found = marks_in(textwrap.dedent(source), "tests/unit/test_x.py")
    return [(p.test.split("::")[1], *dataclasses.astuple(p.cell)) for p in found]


def test_the_docs_matrix_is_current():
    doc = DOC.read_text()
    assert replaced(doc, current()) == doc, "docs/models.md is stale: run scripts/support-matrix"


def test_marks_on_functions_modules_classes_and_cases_are_read():
    source = """
        import pytest
        from pytest import mark

        pytestmark = [pytest.mark.slow, pytest.mark.support("mla", "bytes", "vllm-objects")]

        @pytest.mark.support("fp8-kv", "shape", proof="vllm-objects")
        @pytest.mark.parametrize("x", [1, 2])
        def test_one(x):
            pass

        @pytest.mark.parametrize(
            "x",
            [
                pytest.param(1, id="plain"),
                pytest.param(2, id="int8", marks=[pytest.mark.skip, mark.support(
                    "quantized-kv", "shape", "vllm-objects", refused="per-token-head")]),
            ],
        )
        def test_two(x):
            pass

        @pytest.mark.support("tensor-parallel", "hits", "vllm-cpu")
        class TestThree:
            def test_four(self):
                pass

        def helper():
            pass
    """
    assert read(source) == [
        ("test_one", "mla", "bytes", "vllm-objects", None),
        ("test_one", "fp8-kv", "shape", "vllm-objects", None),
        ("test_two", "mla", "bytes", "vllm-objects", None),
        ("test_two[int8]", "quantized-kv", "shape", "vllm-objects", "per-token-head"),
        ("test_four", "mla", "bytes", "vllm-objects", None),
        ("test_four", "tensor-parallel", "hits", "vllm-cpu", None),
    ]


@pytest.mark.parametrize(
    "source,says",
    [
        ('@pytest.mark.support("mla", "bytes", "in-my-head")\ndef test_a(): pass', "in-my-head"),
        (
            '@pytest.mark.support("mla", "bytes", "vllm-cpu", refused="why")\ndef test_a(): pass',
            "why",
        ),
        ('@pytest.mark.support("mla", "bytes")\ndef test_a(): pass', "missing"),
        ('\n@pytest.mark.support("mla", FEATURE, "vllm-cpu")\ndef test_a(): pass', "x.py:2: "),
        (
            "SUPPORT = pytest.mark.support\n"
            '@SUPPORT("mla", "bytes", "vllm-cpu")\ndef test_a(): pass',
            "cannot read",
        ),
        (
            '@pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.support('
            '"mla", "bytes", "vllm-cpu"))])\ndef test_a(x): pass',
            "literal id=",
        ),
    ],
    ids=["unknown-proof", "unknown-refusal", "missing-argument", "not-literal", "alias", "no-id"],
)
def test_a_mark_the_matrix_cannot_show_is_an_error_naming_its_line(source, says):
    with pytest.raises(ValueError, match=says) as e:
        marks_in(source, "tests/unit/test_x.py")
    assert "tests/unit/test_x.py" in str(e.value)


def proven(arch: str, proof: str, refused: str | None = None, test: str = "t") -> Proven:
    return Proven(Cell(arch, "shape", proof, refused), test)


def test_stored_says_yes_no_in_part_or_not_proven_with_the_reasons():
    yes = proven("pipeline-parallel", "vllm-objects")
    refused = proven("pipeline-parallel", "vllm-objects", "context-parallel")
    gpu = proven("pipeline-parallel", "gpu-check")
    assert (stored([yes, gpu]), reasons([yes, gpu])) == ("yes", " ")
    assert stored([yes, refused]) == "in part"
    assert reasons([yes, refused, refused]) == REFUSALS["context-parallel"]
    assert stored([refused, gpu]) == "no"
    assert stored([gpu]) == "not proven here (GPU check written, not yet run)"
    assert stored([]) == "not tested here yet"


def test_every_architecture_has_a_row_even_with_no_test():
    lines = grid([])
    assert len(lines) == 2 + len(ARCHITECTURES)
    assert all("not tested here yet" in line for line in lines[2:])


def test_a_gpu_check_that_ran_says_where():
    first = dataclasses.replace(ROWS[0], ran="2027-01-05, H100")
    [p, *_] = gpu_proofs((first,))
    assert support_matrix.label(p, short=True) == "GPU check ran (2027-01-05, H100)"
    [p, *_] = gpu_proofs(ROWS[:1])
    assert support_matrix.label(p, short=True) == "GPU check not yet run"
    assert support_matrix.label(p, short=False) == "GPU check written, not yet run"


def test_every_gpu_row_names_cells_of_the_matrix():
    assert {r.name for r in gpu_rows.ROWS} == {
        p.test.removeprefix("scripts/gpu-check --row ") for p in gpu_proofs()
    }
