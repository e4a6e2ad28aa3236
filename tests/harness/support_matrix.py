"""docs/models.md's support matrix, generated from the tests' `support` marks
(tests/harness/support_marks.py) and the rows of `scripts/gpu-check`
(kvbm/gpu_rows.py): `scripts/support-matrix` writes it between the doc's
markers, `--check` says whether the doc is current, and
tests/unit/test_support_matrix.py fails while it is not.

Nothing here runs a test: a mark says what its test proves when it passes,
and CI runs the tests. The matrix is what the marks claim, and each claim
names its tests."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Iterable

from kvbm.gpu_rows import ROWS, Expect, GpuRow
from tests.harness.support_marks import ARCHITECTURES, FEATURES, PROOFS, Cell, Proven, read_marks

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "models.md"
BEGIN = "<!-- support-matrix:begin"
END = "<!-- support-matrix:end -->"
# what a grid cell says of each proof
SHORT = {"vllm-cpu": "vLLM on CPU", "vllm-objects": "in process", "gpu-check": "GPU check"}
EXPECTS = {Expect.SERVED: "kvbm serves it", Expect.OFF: "kvbm turns off, vLLM runs on"}
GPU_NOT_RUN = {True: " not yet run", False: " written, not yet run"}


def gpu_proofs(rows: Iterable[GpuRow] = ROWS) -> list[Proven]:
    """The cells `scripts/gpu-check`'s rows would prove."""
    return [
        Proven(Cell(arch, feature, "gpu-check"), f"scripts/gpu-check --row {row.name}", row.ran)
        for row in rows
        for arch, feature in row.cells
    ]


def label(p: Proven, short: bool) -> str:
    """A proof in words: short in the grid, whole in the list of tests."""
    words = (SHORT if short else PROOFS)[p.cell.proof]
    if p.cell.proof == "gpu-check":
        words += f" ran ({p.ran})" if p.ran else GPU_NOT_RUN[short]
    if not p.cell.refused:
        return words
    return f"refused ({words})" if short else f"refused, {words}"


def stored(proven: list[Proven]) -> str:
    """A row's answer to "stored?": yes where a passing test here stores
    it, in part where another test proves a variant refused."""
    here = [p for p in proven if p.cell.proof != "gpu-check"]
    served = any(not p.cell.refused for p in here)
    refused = any(p.cell.refused for p in here)
    if served:
        return "in part" if refused else "yes"
    if refused:
        return "no"
    if proven:
        return "not proven here (GPU check written, not yet run)"
    return "not tested here yet"


def reasons(proven: list[Proven]) -> str:
    """Why kvbm refuses the row's shape, in whole or in part."""
    return "; ".join(dict.fromkeys(p.cell.reason for p in proven if p.cell.reason)) or " "


def grid(proven: list[Proven]) -> list[str]:
    lines = [
        "| shape | stored? | why refused | " + " | ".join(FEATURES.values()) + " |",
        "|---|---|---|" + "---|" * len(FEATURES),
    ]
    for arch, title in ARCHITECTURES.items():
        row = [p for p in proven if p.cell.architecture == arch]
        cells = []
        for feature in FEATURES:
            here = sorted((p for p in row if p.cell.feature == feature), key=_strength)
            cells.append("; ".join(dict.fromkeys(label(p, short=True) for p in here)) or " ")
        lines.append(f"| {title} | {stored(row)} | {reasons(row)} | " + " | ".join(cells) + " |")
    return lines


def evidence(proven: list[Proven]) -> list[str]:
    """Per architecture, each proof and the tests that make it, strongest
    first; features proven the same way by the same tests share a line."""
    lines = []
    for arch, title in ARCHITECTURES.items():
        tests: dict[tuple[str, str], list[str]] = {}
        for p in sorted((p for p in proven if p.cell.architecture == arch), key=_strength):
            tests.setdefault((p.cell.feature, label(p, short=False)), []).append(p.test)
        ways: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        for (feature, how), named in tests.items():
            ways.setdefault((how, tuple(dict.fromkeys(named))), []).append(FEATURES[feature])
        if ways:
            lines.append(f"- **{title}**")
        for (how, named), features in ways.items():
            shown = ", ".join(f"`{t.removeprefix('tests/')}`" for t in named)
            lines.append(f"  - {'; '.join(features)} ({how}): {shown}")
    return lines


def gpu_rows(rows: Iterable[GpuRow] = ROWS) -> list[str]:
    lines = [
        "| row | model | vLLM arguments added | expects | what | ran |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        args = ", ".join(f"`{k}={v}`" for k, v in r.vllm_args) or "none"
        ran = r.ran or "not yet"
        lines.append(
            f"| `{r.name}` | {r.model} | {args} | {EXPECTS[r.expect]} | {r.about} | {ran} |"
        )
    return lines


def render(proven: list[Proven]) -> str:
    """The generated part of docs/models.md, markers excluded."""
    return "\n".join(
        [
            *grid(proven),
            "",
            "The tests that prove each cell:",
            "",
            *evidence(proven),
            "",
            "The rows of `scripts/gpu-check` (`scripts/gpu-check --list` prints them):",
            "",
            *gpu_rows(),
        ]
    )


def current() -> str:
    return render(read_marks(ROOT) + gpu_proofs())


def replaced(doc: str, block: str) -> str:
    """`doc` with the text between its matrix markers replaced by `block`."""
    begin = doc.index(BEGIN)
    start = doc.index("\n", begin) + 1
    end = doc.index(END, start)
    return doc[:start] + block + "\n" + doc[end:]


def _strength(p: Proven) -> tuple[int, bool, int]:
    """Strongest proof first, a refusal after what is stored, then the
    features in the matrix's order."""
    return (
        list(PROOFS).index(p.cell.proof),
        bool(p.cell.refused),
        list(FEATURES).index(p.cell.feature),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="support-matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is not current")
    args = parser.parse_args(argv)
    doc = DOC.read_text()
    want = replaced(doc, current())
    if args.check:
        if want != doc:
            print(f"{DOC.relative_to(ROOT)} is stale: run scripts/support-matrix", file=sys.stderr)
            return 1
        return 0
    if want != doc:
        DOC.write_text(want)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
