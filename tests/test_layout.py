"""The package's shape: folders that import only the folders below them, no import cycles,
small modules, every private Hydra call in one module, and complexity within ruff's limit."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "cnnlab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The cnnlab modules `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or ({node.module} & modules)
    return found - {_module_name(path)}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    # The graph sees function-level imports.
    assert "cnnlab.analysis.compare" in graph["cnnlab.cli.usage"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_complexity_is_within_ruffs_default_limit():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed beside this Python")
    result = subprocess.run([str(ruff), "check", "--select", "C901", str(PACKAGE)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


# Each folder of cnnlab/ (and each module directly in it) by its place in the layering: code may
# import its own folder and the folders of lower rank, never one above it. Data flows one way:
# data is read and shaped before a model or a run exists, configs are read before anything is
# checked, a run's files are written by runs/ and read by analysis/, the CLI sits on top.
LAYERS = (
    {"errors", "registry", "host_pool", "host_memory"},
    {"progress", "parallel"},
    {"data"},
    {"models"},
    {"config"},
    {"runs"},
    {"transfer"},
    {"analysis"},
    {"training"},
    {"viz"},
    {"cli"},
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def folder_of(module: str) -> str:
    """`cnnlab.data.load` -> `data`; `cnnlab.errors` -> `errors`; `cnnlab` -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {}
    for module, imported in graph.items():
        here = folder_of(module)
        folders.setdefault(here, set()).update(
            folder_of(m) for m in imported if folder_of(m) != here)
    return folders


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {target}" for module, imported in graph.items()
                  for target in imported
                  if RANK[folder_of(target)] > RANK[folder_of(module)])


def test_every_folder_has_a_layer():
    folders = {folder_of(m) for m in import_graph()} - {""}
    assert folders == set(RANK), folders ^ set(RANK)


def test_the_layer_check_sees_an_upward_import():
    graph = {"cnnlab.data.load": {"cnnlab.training.steps"}, "cnnlab.training.steps": set()}
    assert upward_imports(graph) == ["cnnlab.data.load -> cnnlab.training.steps"]


def test_no_folder_imports_one_above_it():
    """E.g. data/ never imports training/, analysis/ never training/, config/ nothing that
    checks a value."""
    assert upward_imports(import_graph()) == []


def test_the_folders_import_graph_has_no_cycle():
    graph = folder_graph(import_graph())
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_reading_a_config_imports_no_validator():
    """config/load.py (compose, load_run_config) sits below every module that checks a value:
    it imports config/ and errors only, so any module may read a saved run's config."""
    imported = import_graph()["cnnlab.config.load"]
    assert {folder_of(m) for m in imported} <= {"config", "errors"}, imported


def test_modules_are_small_and_the_top_folder_shows_the_design():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > 500} == {}
    assert len(list(PACKAGE.glob("*.py"))) <= 8


def test_private_hydra_apis_are_called_from_one_module():
    callers = sorted(p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py")
                     if "hydra._internal" in p.read_text() or "._return_value" in p.read_text())
    assert callers == ["cnnlab/cli/hydra_compat.py"]
