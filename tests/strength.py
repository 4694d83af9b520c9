"""How strongly each test checks what it runs: strong, medium or smoke, counted per test file.

    python tests/strength.py [--functions] [--list KIND] [FILE ...]
    python tests/strength.py --explain tests/test_zoo.py::test_zoo_model_trains

Read from the tests' source (Python's ast), no test is run. A test's checks are its `assert`
statements (each operand of a top-level `and` on its own), its `pytest.raises`/`pytest.warns`,
its calls of numpy.testing's and torch.testing's assertions and its `if ...: raise` (an assertion
by hand), together with those of the functions and fixtures it uses that are defined in its own
file or in tests/helpers.py or that it imports from another tests/ module (followed three calls
deep). Each check is

- strong: a comparison with an answer, within a tolerance or bit for bit: numpy.testing's
  `assert_allclose`/`assert_array_equal`/..., `np.allclose`/`np.array_equal` (not negated),
  `pytest.approx`, `math.isclose`, `torch.testing.assert_close`, `abs(a - b) < tolerance`; or
  an `==` one side of which is computed by an independent library (torch, torchvision, scipy,
  sklearn, PIL, TensorFlow);
- smoke: it only says that something ran: an exit status of 0 or a status "finished", a finite
  or NaN check, a path that exists, something that changed (`!=`, `is not`, a negated
  equality), `isinstance`, an output's shape or dtype, or the truth of a bare value
  (`assert metrics`; a name bound to a filtered list is judged by its filter);
- medium: anything else: equality with a value written in the test, a message that contains a
  text, a bound, an ordering of two values, a refusal (`pytest.raises`), `if ...: raise`.

A test is strong with at least one strong check, smoke when every check is smoke (or it has
none: it passes unless something raises), medium otherwise. Each collected test counts
(`pytest --collect-only`: every parametrized case), or with --functions each test function once.

Limits: it reads syntax, not meaning. An `==` between two runs' results is medium unless it goes
through one of the comparisons above; an `==` against a constant copied from a paper is medium;
a tolerance comparison against a number the code under test produced earlier counts as strong;
checks inside cnnlab's or benchmarks/' code (a function that raises on bad input) are not seen.
"""

from __future__ import annotations

import argparse
import ast
import collections
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
KINDS = ("strong", "medium", "smoke")

# Comparisons with an answer (the name of the function called, whatever its module).
TOLERANT = {"assert_allclose", "assert_array_equal", "assert_array_almost_equal", "assert_equal",
            "assert_almost_equal", "assert_array_max_ulp", "allclose", "array_equal",
            "array_equiv", "isclose", "approx", "assert_close", "assert_frame_equal"}
# Libraries whose results are an independent answer.
REFERENCES = {"torch", "torchvision", "scipy", "sklearn", "PIL", "Image", "tf", "tensorflow",
              "torch_reference"}
# Calls that only say a run happened or left something behind.
OUTCOMES = {"isfinite", "isnan", "isinf", "exists", "is_file", "is_dir", "isfile", "isdir",
            "isinstance", "callable"}
# Calls judged by what they reduce, and the calls whose result they may reduce.
REDUCED = TOLERANT | OUTCOMES | {"bool", "all", "any"}
FORM = {"shape", "dtype", "ndim"}
EXIT_NAMES = ("returncode", "exitcode", "exit_code", "rc", "code", "status")


def _name(node: ast.AST) -> str:
    """The last name of a called or referenced thing: `np.testing.assert_allclose` ->
    `assert_allclose`."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _name(node.func)
    return ""


def _roots(node: ast.AST) -> set[str]:
    """Every module-like name an expression starts from (`torch.nn.functional.relu` -> torch)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _calls(node: ast.AST) -> Iterator[ast.Call]:
    return (n for n in ast.walk(node) if isinstance(n, ast.Call))


def _is_equality(node: ast.AST) -> bool:
    if isinstance(node, ast.Compare):
        return all(isinstance(op, ast.Eq | ast.Is) for op in node.ops)
    return isinstance(node, ast.Call) and _name(node) in TOLERANT


def _is_exit_status(node: ast.Compare) -> bool:
    """`result.returncode == 0`, `status == "finished"`: the run ended without an error."""
    parts = [node.left, *node.comparators]
    zero = any(isinstance(p, ast.Constant) and p.value == 0 for p in parts)
    finished = any(isinstance(p, ast.Constant) and p.value == "finished" for p in parts)
    exit_side = any(ast.unparse(p).split(".")[-1].split("[")[0].strip("'\"") in EXIT_NAMES
                    or "returncode" in ast.unparse(p) for p in parts)
    return finished or (zero and exit_side)


def _is_form(node: ast.Compare) -> bool:
    """`logits.shape == (2, 10)`: the form of an output, not its values."""
    return any(isinstance(p, ast.Attribute) and p.attr in FORM
               for p in [node.left, *node.comparators])


def _is_tolerance(node: ast.Compare) -> bool:
    """`np.abs(ours - theirs).max() < 1e-4`: a difference within a tolerance."""
    differences = [c for c in _calls(node.left) if _name(c) in {"abs", "fabs"} and c.args
                   and isinstance(c.args[0], ast.BinOp) and isinstance(c.args[0].op, ast.Sub)]
    return bool(differences) and all(isinstance(op, ast.Lt | ast.LtE) for op in node.ops)


def _compare_kind(node: ast.Compare) -> str:
    if any(_name(c) in TOLERANT for c in _calls(node)) or _is_tolerance(node):
        return "strong"
    if all(isinstance(op, ast.NotEq | ast.IsNot) for op in node.ops):
        return "smoke"
    if all(isinstance(op, ast.Eq) for op in node.ops) and (
            _is_exit_status(node) or _is_form(node)):
        return "smoke"
    if any(isinstance(op, ast.Eq) for op in node.ops) and _roots(node) & REFERENCES:
        return "strong"
    return "medium"


def _call_kind(node: ast.Call, scope: dict[str, ast.expr]) -> str:
    name = _name(node)
    if name in TOLERANT:
        return "strong"
    if name in OUTCOMES:
        return "smoke"
    # bool(x), x.all(), np.all(x), all(x for ...): judged by what they reduce.
    inner = node.args[0] if node.args else getattr(node.func, "value", None)
    if name in {"bool", "all", "any"} and inner is not None:
        if isinstance(inner, ast.GeneratorExp | ast.ListComp | ast.SetComp):
            return check_kind(inner.elt, scope)
        if isinstance(inner, ast.Compare | ast.UnaryOp) or _name(inner) in REDUCED:
            return check_kind(inner, scope)
        return "smoke"  # the truth of each value of a collection
    return "medium"


def _name_kind(node: ast.Name, scope: dict[str, ast.expr]) -> str:
    """A bare name's truth; a name bound to a filtered comprehension is judged by its filter
    (`matches = [s for s in shifts if np.array_equal(...)]; assert matches`)."""
    value = scope.get(node.id)
    if isinstance(value, ast.ListComp | ast.SetComp | ast.GeneratorExp):
        conditions = [c for g in value.generators for c in g.ifs]
        if conditions:
            return classify((check_kind(c, {}), "", c) for c in conditions)
    return "smoke"


def check_kind(node: ast.expr, scope: dict[str, ast.expr] | None = None) -> str:
    """The kind of one asserted expression; scope: the names the function binds."""
    scope = scope or {}
    if isinstance(node, ast.Compare):
        return _compare_kind(node)
    if isinstance(node, ast.Call):
        return _call_kind(node, scope)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return "smoke" if _is_equality(node.operand) else "medium"
    if isinstance(node, ast.BoolOp):  # `a or b`: the weaker one is all it needs
        kinds = [check_kind(v, scope) for v in node.values]
        return "smoke" if "smoke" in kinds else "medium" if "medium" in kinds else "strong"
    if isinstance(node, ast.Name):
        return _name_kind(node, scope)
    return "smoke"  # a bare value's truth


def _conjuncts(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return [part for value in node.values for part in _conjuncts(value)]
    return [node]


def own_checks(body: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """The checks written in one function (nested functions included): (kind, node)."""
    scope = {t.id: n.value for n in ast.walk(body) if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(t, ast.Name)}
    for node in ast.walk(body):
        if isinstance(node, ast.Assert):
            yield from ((check_kind(part, scope), part) for part in _conjuncts(node.test))
        elif isinstance(node, ast.Call) and _name(node) in {"raises", "warns"}:
            yield "medium", node
        elif isinstance(node, ast.If) and any(isinstance(n, ast.Raise) for n in node.body):
            yield "medium", node.test  # `if count != 1: raise ...`: an assertion by hand
        elif isinstance(node, ast.Call) and _name(node).startswith("assert_") and (
                _name(node) in TOLERANT or _roots(node.func) & {"np", "numpy", "torch"}):
            yield ("strong" if _name(node) in TOLERANT else "medium"), node


def _definitions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _imported(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """The functions a test module imports from the tests' own modules (`from tests.mutants
    import apply`)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
            path = REPO / (node.module.replace(".", "/") + ".py")
            defined = _definitions(ast.parse(path.read_text())) if path.is_file() else {}
            found.update({a.name: defined[a.name] for a in node.names if a.name in defined})
    return found


def _used(function: ast.FunctionDef, known: dict[str, ast.FunctionDef]) -> Iterator[str]:
    """The names of known functions a function calls, passes on or takes as fixtures."""
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and node.id in known:
            yield node.id
        elif isinstance(node, ast.Attribute) and node.attr in known:
            yield node.attr
    for arg in function.args.args:
        if arg.arg in known:
            yield arg.arg


def checks_of(test: ast.FunctionDef,
              known: dict[str, ast.FunctionDef]) -> list[tuple[str, str, ast.AST]]:
    """A test's checks, with those of the known functions it uses: (kind, function, node)."""
    kinds, seen, frontier = [], {test.name}, [test]
    for _ in range(4):  # the test, then three calls deep
        kinds += [(kind, function.name, node) for function in frontier
                  for kind, node in own_checks(function)]
        names = {name for function in frontier for name in _used(function, known)} - seen
        seen |= names
        frontier = [known[name] for name in sorted(names)]
    return kinds


def classify(checks: Iterable[tuple[str, str, ast.AST]]) -> str:
    kinds = {kind for kind, _, _ in checks}
    if "strong" in kinds:
        return "strong"
    return "medium" if "medium" in kinds else "smoke"


def classify_source(source: str, helpers: str = "") -> dict[str, str]:
    """{test name: kind} for every test function of a module's source."""
    tree = ast.parse(source)
    known = {**_definitions(ast.parse(helpers)), **_imported(tree), **_definitions(tree)}
    tests = [n for n in ast.walk(tree)
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]
    return {t.name: classify(checks_of(t, known)) for t in tests}


def classify_files(files: list[Path]) -> dict[tuple[str, str], str]:
    helpers = (TESTS / "helpers.py").read_text()
    return {(path.name, name): kind for path in files
            for name, kind in classify_source(path.read_text(), helpers).items()}


def explain(path: Path, test_name: str) -> str:
    """Each check a test is judged by, with its kind: what to read when a count surprises."""
    tree = ast.parse(path.read_text())
    known = {**_definitions(ast.parse((TESTS / "helpers.py").read_text())), **_imported(tree),
             **_definitions(tree)}
    test = next(n for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef) and n.name == test_name)
    checks = checks_of(test, known)
    lines = [f"{kind:6} {where}:{node.lineno} {ast.unparse(node)[:90]}"
             for kind, where, node in checks]
    return "\n".join([*lines, f"-> {classify(checks)}"])


def collected(files: list[Path]) -> collections.Counter:
    """How many tests pytest collects for each (file, function)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *map(str, files)], cwd=REPO,
                         capture_output=True, text=True, check=False)
    counts = collections.Counter()
    for line in out.stdout.splitlines():
        if "::" in line:
            path, *_, name = line.split("::")
            counts[(Path(path).name, name.split("[")[0])] += 1
    return counts


def table(kinds: dict[tuple[str, str], str], weights: collections.Counter | None) -> str:
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (file, name), kind in kinds.items():
        per_file[file][kind] += weights[(file, name)] if weights is not None else 1
    per_file["all files"] = sum(per_file.values(), collections.Counter())
    lines = ["| file | tests | strong | medium | smoke | smoke share |",
             "|---|---:|---:|---:|---:|---:|"]
    for file in [*sorted(f for f in per_file if f != "all files"), "all files"]:
        counts = per_file[file]
        total = sum(counts.values())
        share = f"{100 * counts['smoke'] / total:.0f}%" if total else "-"
        cells = [str(counts[k]) for k in KINDS]
        lines.append(f"| {file} | {total} | {' | '.join(cells)} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--functions", action="store_true",
                        help="count each test function once, not each collected test")
    parser.add_argument("--list", choices=KINDS, help="also list the tests of this kind")
    parser.add_argument("--explain", metavar="FILE::TEST", help="list one test's checks")
    args = parser.parse_args(argv)
    if args.explain:
        path, name = args.explain.split("::")
        print(explain(Path(path).resolve(), name))
        return
    files = [f.resolve() for f in args.files] or sorted(TESTS.glob("test_*.py"))
    kinds = classify_files(files)
    print(table(kinds, None if args.functions else collected(files)))
    if args.list:
        print("\n".join(f"{file}::{name}" for (file, name), kind in sorted(kinds.items())
                        if kind == args.list))


if __name__ == "__main__":
    main()
