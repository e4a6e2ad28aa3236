"""The shape of the code, checked: the dependency direction of DESIGN.md
(`kvbm` uses `transport` and `discovery`; those two never import `kvbm`, nor
each other), engines apart from the daemon, a daemon without torch, the
environment read in one place, a transport that knows no index, and the
index used through its Protocol."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORBIDDEN = {"transport": {"kvbm", "discovery"}, "discovery": {"kvbm", "transport"}}


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imported_packages(path: pathlib.Path) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_packages_never_import_upwards(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for f in files:
        bad = imported_packages(f) & FORBIDDEN[package]
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_no_grab_bag_modules():
    for name in ("utils.py", "helpers.py", "misc.py", "common.py"):
        assert not list(ROOT.glob(f"*/{name}")), name


def _modules(*packages: str) -> list[pathlib.Path]:
    return sorted(f for p in packages for f in (ROOT / p).rglob("*.py"))


def _is_daemon(module: str) -> bool:
    return module == "kvbm.node" or module.startswith("kvbm.node.")


def test_the_engine_side_never_imports_the_daemon():
    # engines and the node meet only in kvbm/engine_wire.py
    for f in _modules("kvbm/connector"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not _is_daemon(node.module), f"{f.relative_to(ROOT)}"
                if node.module == "kvbm":
                    assert "node" not in {a.name for a in node.names}, f"{f.relative_to(ROOT)}"
            elif isinstance(node, ast.Import):
                assert not any(_is_daemon(a.name) for a in node.names), f


def test_the_node_daemon_loads_without_torch():
    # a fresh interpreter: what importing the daemon drags in, and nothing else
    code = "import sys, kvbm.node.daemon; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing kvbm.node.daemon imported torch"


# Reading the environment is configuration, and configuration is merged in one
# place: kvbm/config.py (and the secret loader, which may take the secret
# from KVBM_SECRET). A stray variable must never change what a node does.
ENV_READERS = {"kvbm/config.py", "transport/secret.py"}


def environment_reads(path: pathlib.Path) -> list[int]:
    """Lines that read os.environ or call os.getenv (setting a variable for a
    child, `os.environ.update(...)` or `os.environ[k] = v`, is not a read)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("getenv", "getenvb", "environb"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute | ast.Name) and (
            getattr(node, "attr", None) == "environ" or getattr(node, "id", None) == "environ"
        ):
            up = parents.get(node)
            writes = (isinstance(up, ast.Attribute) and up.attr == "update") or (
                isinstance(up, ast.Subscript) and isinstance(up.ctx, ast.Store)
            )
            if not writes:
                lines.append(node.lineno)
    return lines


def test_only_the_config_reads_the_environment():
    for f in _modules("kvbm", "transport", "discovery"):
        name = str(f.relative_to(ROOT))
        if name not in ENV_READERS:
            assert not environment_reads(f), f"{name} reads the environment"


def test_the_environment_check_sees_a_read():
    # the check above can fail: it flags what it must
    assert environment_reads(ROOT / "kvbm/config.py")
    assert environment_reads(ROOT / "transport/secret.py")


# The transport carries calls it does not understand: the index's calls are
# registered with the peer server by the node (kvbm/node/index_calls.py), and
# no name in transport/ speaks of places, owners or shards.
INDEX_WORDS = {"place", "places", "placed", "locate", "located", "owner", "owners", "shard"}
INDEX_WORDS |= {"shards", "sharded", "location", "locations"}


def _words(name: str) -> set[str]:
    """`LocationOwner` -> {"location", "owner"}; `_wire_places` -> {"wire", "places"}."""
    spaced = "".join(f" {c}" if c.isupper() else c for c in name)
    return {w.lower() for w in spaced.replace("_", " ").split()}


def index_words(source: str) -> set[str]:
    """The index words in a module's code: its names, attributes, arguments
    and the strings that could name a call (docstrings and prose are not code)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, ast.arg):
            names.append(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.alias):
            names.extend(node.name.split("."))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and node.value.isidentifier()  # a call's or a field's name, not a sentence
        ):
            names.append(node.value)
    return {w for n in names for w in _words(n)} & INDEX_WORDS


def test_the_transport_knows_no_index():
    for f in _modules("transport"):
        assert not imported_packages(f) & {"discovery"}, f"{f.relative_to(ROOT)} imports discovery"
        words = index_words(f.read_text())
        assert not words, f"{f.relative_to(ROOT)} names the index: {sorted(words)}"


def test_the_index_word_check_sees_one():
    # the check above can fail: the calls and the port that transport/ had
    assert index_words('CALLS = ("pin", "locate")') == {"locate"}
    assert index_words("class LocationOwner(Protocol): ...") == {"location", "owner"}
    assert index_words("def f(xs):\n    return _wire_places(xs)") == {"places"}
    assert not index_words('"""Takes the place of the idlest."""\nx = "a place taken"')


# The publisher and onboarding meet the index through its contract
# (discovery/index.py), never one of its implementations: a new layout is a
# new class behind the Protocol, and neither of them changes.
INDEX_CLIENTS = ("kvbm/node/publisher.py", "kvbm/node/onboarding.py")
INDEX_IMPLEMENTATIONS = {
    "discovery.etcd_index",
    "discovery.memory",
    "discovery.mirror",
    "discovery.mirror_layout",
    "discovery.sharded",
    "discovery.sharded_layout",
}


@pytest.mark.parametrize("client", INDEX_CLIENTS)
def test_the_index_is_used_through_its_protocol(client):
    path = ROOT / client
    modules = imported_modules(path)
    assert "discovery.index" in modules, f"{client} does not name the index's Protocol"
    assert not modules & INDEX_IMPLEMENTATIONS, (
        f"{client} imports {modules & INDEX_IMPLEMENTATIONS}"
    )
    calls = [
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "isinstance"
    ]
    assert not calls, f"{client} asks which index it has (isinstance)"


# Test helpers live in the test tree (tests/harness/), and tests import bench
# code only to test the benches: a bench's module changes with its figures,
# and a test leaning on it for a helper would change with them (or keep a
# helper alive in the product for tests alone).
BENCH_TESTS = {
    "tests/unit/test_runs.py": {"kvbm.bench.fleet_trace"},  # `bench index --nodes`' trace
    "tests/integration/test_sharded_nodes.py": {"kvbm.bench.index"},  # its sharded fleet
    "tests/system/faults/test_soak.py": {"kvbm.bench.soak"},  # `kvbm bench soak`, short
    "tests/unit/test_bench_engines.py": {"kvbm.bench.engines"},  # a phase's figures
    # `bench engines`' crew of engine processes on a real node
    "tests/integration/test_bench_engines.py": {"kvbm.bench.engine_crew", "kvbm.bench.engines"},
}


def imported_names(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, by full name
    (`from kvbm.bench import soak` names kvbm.bench.soak, `from kvbm import
    bench` kvbm.bench)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def bench_imports(path: pathlib.Path) -> set[str]:
    return {m for m in imported_names(path) if (m + ".").startswith("kvbm.bench.")}


def test_tests_import_bench_code_only_to_test_the_benches():
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert files
    for f in files:
        name = str(f.relative_to(ROOT))
        benches = BENCH_TESTS.get(name, set())
        stray = {m for m in bench_imports(f) if not any(m.startswith(b) for b in benches)}
        assert not stray, f"{name} imports bench code: {stray}"
    # the check sees what it must: each bench test's imports, a nested one included
    for name, benches in BENCH_TESTS.items():
        assert any(m.startswith(b) for m in bench_imports(ROOT / name) for b in benches), name


def test_test_files_sit_in_a_tier_and_the_harness_holds_no_tests():
    """tests/unit (no processes, root, network or etcd), tests/integration,
    tests/system; what the tests share or start is in tests/harness."""
    tiers = {"unit", "integration", "system"}
    for f in sorted((ROOT / "tests").rglob("test_*.py")):
        assert f.relative_to(ROOT / "tests").parts[0] in tiers, f"{f.relative_to(ROOT)}: no tier"
    assert not list((ROOT / "tests" / "harness").rglob("test_*.py"))


def test_the_unit_tier_needs_no_vllm():
    # `./scripts/test --unit` installs the test tools without vLLM (a minute, not
    # four): a unit test that imports vLLM, or the connector package that does,
    # fails to collect on a fresh clone
    for f in sorted((ROOT / "tests" / "unit").rglob("*.py")):
        names = imported_names(f) | imported_modules(f)
        bad = {n for n in names if n.split(".")[0] == "vllm" or n.startswith("kvbm.connector.vllm")}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"
