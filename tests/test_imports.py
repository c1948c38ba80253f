"""pipelines/ imports go one way (the README's Layout section), read from the source (ast), lazy
imports inside functions included, nothing imported: the layers, and no circle of modules."""
from __future__ import annotations

import ast

from tests.paths import REPO

#: The bottom layer: top-level modules every layer may use, which import nothing from pipelines/.
FOUNDATION = {"pipelines.base", "pipelines.options", "pipelines.progress", "pipelines.weights"}
#: Layers, lowest first; a module not named here or below is a pipeline (cxr, sr3d, ..., qa, registry).
LAYERS = {"dicom": 1, "models": 2, "training": 4, "evaluation": 4}
PIPELINES_LAYER = 3


def _modules() -> dict[str, tuple[ast.Module, str]]:
    """module name -> (its syntax tree, the package its relative imports start from)."""
    found = {}
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        package = ".".join(path.parent.relative_to(REPO).parts)
        found[".".join(parts)] = (ast.parse(path.read_text(), str(path)), package)
    return found


def _imports(tree: ast.Module, package: str, known: set[str]) -> set[str]:
    """Every module of pipelines/ or node/ that ``tree`` imports, anywhere in its code
    (``from pipelines.x import y``: ``pipelines.x.y`` where that is a module, else ``pipelines.x``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in out if m.split(".")[0] in ("pipelines", "node")}


def _layer(module: str) -> int:
    if module in FOUNDATION:
        return 0
    parts = module.split(".")
    return LAYERS.get(parts[1], PIPELINES_LAYER) if len(parts) > 1 else PIPELINES_LAYER


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(tree, package, set(modules)) for name, (tree, package) in modules.items()}


def test_imports_go_from_a_layer_to_the_layers_below():
    graph = _graph()
    assert {"pipelines.dicom.series", "pipelines.models.intensity", "pipelines.evaluation.eval_sr3d"} <= set(graph)
    wrong = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if target.startswith("node"):
                wrong.append(f"{module} imports {target}: pipelines/ never imports the node")
            elif module in FOUNDATION:
                wrong.append(f"{module} imports {target}: the foundation modules import nothing from pipelines/")
            elif _layer(target) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert wrong == [], "\n".join(wrong)


def test_no_modules_import_each_other_in_a_circle():
    graph = _graph()
    circles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert circles == [], "\n".join(circles)
