"""The library's layers (README, Architecture): every module imports only its own layer or those
below, function-local imports included, and no two modules import each other in a cycle."""
import ast
from pathlib import Path

import pytest

from vcb_lib.config import PROJECT_ROOT

LIB = PROJECT_ROOT / "vcb_lib"
LAYERS = {
    1: ["io", "config", "losses", "policy_gradient", "theory", "manifest", "tasks", "launch"],  # ground: pure functions, typed config
    2: ["models", "logps"],  # model specs and loading; log-prob kernels
    3: ["data", "samplers", "user_data"],  # prompt sets, hub loaders, D_t builder, a researcher's own files
    4: ["rewards", "reward_sources", "checkpoints", "trainers", "onpolicy", "metrics", "estimators", "exact", "judge", "judgments", "plots"],  # methods and measures
    5: ["stages"],  # one module per notebook
    6: ["sweep", "widgets", "runner", "report", "export", "__main__"],  # fronts
}
# Heavy optional dependencies: imported only inside functions, only by these modules.
LAZY_ONLY = {"vllm": {"vcb_lib.samplers"}}


def module_name(path: Path) -> str:
    rel = path.relative_to(PROJECT_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README's Architecture)")


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                out.append((base, child.lineno, nested))
                out.extend((f"{base}.{a.name}", child.lineno, nested) for a in child.names)  # `from pkg import module`
            visit(child, inner)

    visit(tree, False)
    return out


MODULES = {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        edges[name] = {m for m, _, _ in imports(path) if m in MODULES and m != name and m != "vcb_lib"}
    return edges


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_only(name):
    if name == "vcb_lib":
        return
    mine = layer_of(name)
    bad = [f"line {line}: {m} (layer {layer_of(m)})" for m, line, _ in imports(MODULES[name])
           if m in MODULES and m != "vcb_lib" and layer_of(m) > mine]
    assert not bad, f"{name} (layer {mine}) imports a higher layer: {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_heavy_optional_dependencies_are_lazy(name):
    for m, line, nested in imports(MODULES[name]):
        root = m.split(".")[0]
        if root in LAZY_ONLY:
            assert nested and name in LAZY_ONLY[root], \
                f"{name} line {line} imports {m}: only {sorted(LAZY_ONLY[root])} may, inside a function"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def dfs(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := dfs(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state and (cycle := dfs(n)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_look_for():
    """The checker itself: a planted cycle and a planted upward import are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("vcb_lib.stages.train") == 5 > layer_of("vcb_lib.data")
    found = imports(LIB / "stages" / "train.py")
    assert any(m == "vcb_lib.launch" and nested for m, _, nested in found)  # a function-local import is seen
