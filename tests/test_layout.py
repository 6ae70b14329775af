"""The package layout: no import cycle in pipeline/, imports point downward, dvc.yaml deps match the imports.

Imports are read with `ast` from every module, function-level and TYPE_CHECKING ones included: a
cycle that only a lazy import closes is still a knot in the design. Importing `a.b.c` runs `a` and
`a.b` first, so those count as run by a stage, but not as an edge of the graph (a package's
`__init__` may re-export its modules without closing a cycle through them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Run by every stage, left out of the deps on purpose (see the comment at the top of dvc.yaml).
NOT_DEPS = {"pipeline/__init__.py", "python_steps/__init__.py"} | {
    str(p.relative_to(ROOT)) for p in (ROOT / "pipeline" / "params").glob("*.py")
}
# A module longer than this holds more than one concern: split it by what its parts do.
MAX_LINES = 700
# Over MAX_LINES and still to be split; an entry that fits again must leave (the test says so).
TOO_LONG_FOR_NOW: set[str] = set()


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in its body (`from p import m` names the module p.m)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}")}
            found |= submodules or {base}
    return {m for m in found if m.split(".")[0] in ("pipeline", "python_steps") and module_file(m) and m != name}


def graph(folder: str) -> dict[str, set[str]]:
    return {module_name(p): imported(p) for p in sorted((ROOT / folder).rglob("*.py"))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colours white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_pipeline():
    cycle = find_cycle(graph("pipeline"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_a_stage():
    upward = {m: sorted(d for d in deps if d.startswith("python_steps")) for m, deps in graph("pipeline").items()}
    assert {m: d for m, d in upward.items() if d} == {}


def test_subpackages_import_their_siblings_by_module():
    """Inside a subpackage, `from pipeline.llm import X` would run the package's own `__init__`
    half-way through importing it: siblings are imported by their module path."""
    bad = {
        m: sorted(d for d in deps if d == m.rpartition(".")[0])
        for m, deps in graph("pipeline").items()
        if m.count(".") == 2
    }
    assert {m: d for m, d in bad.items() if d} == {}


def reached(module: str) -> set[str]:
    """Modules that importing `module` runs: its imports, transitively, with the packages on the way."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in imported(module_file(name)):
            parts = dep.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return seen


def runs(stage_module: str) -> set[str]:
    """Files a stage module runs."""
    return {str(module_file(m).relative_to(ROOT)) for m in reached(stage_module)}


def test_llm_never_reaches_evaluation():
    """Generation and scoring sit below evaluation (the judge uses them): not even a lazy import, or
    one through another pipeline module, may lead from pipeline/llm into pipeline/evaluation."""
    upward = {
        m: sorted(d for d in reached(m) if d.startswith("pipeline.evaluation"))
        for m in graph("pipeline")
        if m.startswith("pipeline.llm")
    }
    assert {m: d for m, d in upward.items() if d} == {}


def test_one_module_decides_what_auto_picks():
    """Only pipeline/device.py asks the hardware about bf16, so the encoder, training and the LLM
    cannot resolve `dtype: auto` by different rules on one machine."""
    probes = ("bf16_supported", "_is_amx_tile_supported")
    askers = sorted(
        str(path.relative_to(ROOT))
        for folder in ("pipeline", "python_steps")
        for path in (ROOT / folder).rglob("*.py")
        if any(probe in path.read_text() for probe in probes)
    )
    assert askers == ["pipeline/device.py"]


def test_no_module_over_max_lines():
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for folder in ("pipeline", "python_steps")
        for path in (ROOT / folder).rglob("*.py")
    }
    assert {f: n for f, n in lengths.items() if n > MAX_LINES and f not in TOO_LONG_FOR_NOW} == {}
    assert sorted(f for f in TOO_LONG_FOR_NOW if lengths.get(f, 0) <= MAX_LINES) == [], "fits now: drop it from TOO_LONG_FOR_NOW"


@pytest.mark.parametrize("module", ["pipeline.labelled", "pipeline.device", "pipeline.progress"])
def test_the_bottom_floor_imports_no_pipeline_module(module):
    """The eval sets' readers and seeded hashes, the device rule and the progress bar serve
    generation, training and evaluation alike: importing nothing of theirs, they never make one
    depend on another."""
    assert reached(module) == {module}


def test_python_stage_deps_are_the_modules_they_run():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        if not stage["cmd"].startswith("python -m python_steps."):
            continue
        code = {d for d in stage["deps"] if d.split("/")[0] in ("pipeline", "python_steps")}
        listed = set()
        for dep in code:
            listed |= {str(p.relative_to(ROOT)) for p in (ROOT / dep).rglob("*.py")} if (ROOT / dep).is_dir() else {dep}
        needed = runs(stage["cmd"].split()[-1]) - NOT_DEPS
        assert sorted(needed - listed) == [], f"{name}: modules it runs, missing from its dvc.yaml deps"
        assert sorted(listed - needed) == [], f"{name}: dvc.yaml deps it does not run"
        checked += 1
    assert checked >= 6
