"""The package's import rules, read from the source (every import statement, nested ones too).

* ``eco_m2f.modeling`` imports nothing from ``eco``, ``evaluation`` or ``engine``;
* ``eco_m2f.eco`` imports nothing from ``engine``;
* no import cycle between the package's modules;
* ``ECOMaskFormer`` is registered without ``modeling`` importing ``eco``: by the one builder
  module, ``eco_m2f.architectures``, which imports both and which nothing in ``modeling`` reaches.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "eco_m2f"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom of a module, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> Set[str]:
    """The project modules ``module`` imports: ``from X import Y`` names X.Y when Y is a module."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    out: Set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _resolve(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        out.update(t for t in targets if t == "eco_m2f" or t.startswith("eco_m2f."))
    return out


GRAPH: Dict[str, Set[str]] = {m: _imports(m) for m in MODULES}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(source: str, forbidden: List[str]) -> List[str]:
    return sorted(
        f"{m} imports {t}" for m, ts in GRAPH.items() if _in(m, source) for t in ts if any(_in(t, f) for f in forbidden)
    )


def test_the_graph_sees_lazy_imports():
    # the rules below mean something only if nested imports are read
    assert "eco_m2f.evaluation.testing" in GRAPH["eco_m2f.engine.evaluate"]  # an import inside a function
    assert "eco_m2f.modeling.registry" in GRAPH["eco_m2f.eco.meta_arch"]


def test_modeling_imports_no_eco_evaluation_or_engine():
    assert _violations("eco_m2f.modeling", ["eco_m2f.eco", "eco_m2f.evaluation", "eco_m2f.engine"]) == []


def test_eco_imports_no_engine():
    assert _violations("eco_m2f.eco", ["eco_m2f.engine"]) == []


def test_no_import_cycles():
    """Tarjan's strongly connected components; any component of more than one module is a cycle."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in GRAPH[v]:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(GRAPH)))
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


def _reachable(start: str) -> Set[str]:
    seen, todo = set(), [m for m in GRAPH if _in(m, start)]
    while todo:
        m = todo.pop()
        if m in seen or m not in GRAPH:
            continue
        seen.add(m)
        todo.extend(GRAPH[m])
    return seen


def test_eco_meta_architecture_is_registered_by_the_builder_module_only():
    builder = "eco_m2f.architectures"
    assert "eco_m2f.eco.meta_arch" in GRAPH[builder] and "eco_m2f.modeling.meta_arch" in GRAPH[builder]
    # nothing modeling imports, directly or through other modules, is eco's or the builder
    reached = _reachable("eco_m2f.modeling")
    assert sorted(m for m in reached if _in(m, "eco_m2f.eco") or m == builder) == []
    from eco_m2f.architectures import build_model  # noqa: F401  (imports both sides)
    from eco_m2f.modeling.registry import META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("ECOMaskFormer").__module__ == "eco_m2f.eco.meta_arch"
    assert META_ARCH_REGISTRY.get("MaskFormer").__module__ == "eco_m2f.modeling.meta_arch.mask_former"
