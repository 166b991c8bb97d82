"""The import graph is the architecture (docs/architecture.md): every module of ``tsbd`` belongs to a
layer and imports only its own layer and the layers below; nothing outside ``tsbd/cli/`` imports
the CLI; and the modules import each other without cycles.

Imports are read from the source with ``ast``: ``import tsbd.x`` / ``from tsbd.x import y`` at module
level and inside functions, and string constants naming a tsbd module (``importlib.import_module``,
a registry's package; docstrings are prose, not imports, and are skipped). The layer rules count
all three. The cycle rules count import statements: those at module level (run when a module is
loaded) must form no cycle, and neither may they together with the function-level ones (an import
moved into a function to dodge a cycle is still a back-edge). A string is no import statement: a
registry names its own package, whose modules it imports on first lookup.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tsbd"

# lowest first; a module may import its own layer and any layer below it
LAYERS: list[tuple[str, ...]] = [
    ("tsbd.errors", "tsbd.registry", "tsbd.config"),
    ("tsbd.data",),
    ("tsbd.train",),
    ("tsbd.models", "tsbd.metrics"),
    ("tsbd.artifacts", "tsbd.reference"),
    ("tsbd.attacks", "tsbd.defenses"),
    ("tsbd.pipeline",),
    ("tsbd.bench", "tsbd.analysis", "tsbd.interop"),
    ("tsbd.cli",),
]
EXEMPT = {"tsbd", "tsbd.__main__"}  # the package facade and the `python -m tsbd` entry point
MODULE_NAME = re.compile(r"\btsbd(?:\.\w+)+")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The longest prefix of the dotted ``name`` that is a tsbd module (``tsbd.x.func`` -> ``tsbd.x``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in FILES:
            return candidate
        parts.pop()
    return None


def _layer(module: str) -> int | None:
    for i, group in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in group):
            return i
    return None


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _imports(module: str, path: Path) -> list[tuple[str, int, str]]:
    """(imported tsbd module, line, "module" | "function" | "string") for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    docstrings = _docstrings(tree)
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, top: bool) -> None:
        kind = "module" if top else "function"
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno, kind))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:  # `from tsbd.x import y`: y may be a module itself
                full = f"{base}.{alias.name}"
                found.append((full if _resolve(full) == full else base, node.lineno, kind))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            for match in MODULE_NAME.findall(node.value):
                found.append((match, node.lineno, "string"))
        inner = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    out = []
    for name, line, kind in found:
        target = _resolve(name) if name.startswith("tsbd") else None
        if target and target != module and (target, line, kind) not in out:
            out.append((target, line, kind))
    return out


GRAPH = {m: _imports(m, p) for m, p in FILES.items()}


def _where(module: str, line: int) -> str:
    return f"{FILES[module].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_has_a_layer():
    assert [m for m in FILES if m not in EXEMPT and _layer(m) is None] == []


def test_no_module_imports_a_higher_layer():
    bad = []
    for module, imports in GRAPH.items():
        if module in EXEMPT:
            continue
        for target, line, _ in imports:
            if target not in EXEMPT and _layer(target) > _layer(module):
                bad.append(f"{_where(module, line)}: {module} (layer {_layer(module)}) imports {target} "
                           f"(layer {_layer(target)})")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_only_the_cli_imports_the_cli():
    bad = [f"{_where(module, line)}: {module} imports {target}"
           for module, imports in GRAPH.items() if module not in EXEMPT and _layer(module) != _layer("tsbd.cli")
           for target, line, _ in imports if _layer(target) == _layer("tsbd.cli")]
    assert not bad, "imports of tsbd.cli from outside tsbd/cli/:\n" + "\n".join(bad)


def _cycles(kinds: set[str]) -> list[str]:
    """Each cycle of the graph of the imports of ``kinds``, as ``a (file:line) -> b (file:line) -> a``."""
    edges = {m: [(t, line) for t, line, kind in imports if kind in kinds] for m, imports in GRAPH.items()}
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[tuple[str, int]] = []

    def visit(module: str) -> None:
        state[module] = 1
        for target, line in edges[module]:
            stack.append((module, line))
            if state.get(target) == 1:
                start = next(i for i, (m, _) in enumerate(stack) if m == target)
                cycle = " -> ".join(f"{m} ({_where(m, ln)})" for m, ln in stack[start:]) + f" -> {target}"
                if cycle not in cycles:
                    cycles.append(cycle)
            elif target not in state:
                visit(target)
            stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return cycles


def test_module_level_imports_form_no_cycle():
    cycles = _cycles({"module"})
    assert not cycles, "import cycles between tsbd modules (module-level imports):\n" + "\n".join(cycles)


def test_no_cycle_through_function_level_imports_either():
    cycles = _cycles({"module", "function"})
    assert not cycles, "import cycles between tsbd modules (with function-level imports):\n" + "\n".join(cycles)
