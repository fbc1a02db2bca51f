"""The library's layout shows its architecture: the layer's parts (lessons_lib.moe) import no model built from
them (lessons_lib.model), measurement (lessons_lib.lab) or course tool (lessons_lib.course); the model imports
no measurement or course tool; and no module imports itself back through others.
Imports inside functions count too."""
import ast
from pathlib import Path

import lessons_lib

ROOT = Path(lessons_lib.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the lessons_lib modules it imports (a package's __init__ counts as the package)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # `from .x import y`: y may be a module of package x; keep the longest known module name
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def test_the_three_kinds_have_their_folders():
    kinds = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert kinds == {"moe", "model", "lab", "course"}
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py"]


def test_the_layers_parts_import_no_model_measurement_or_course_module():
    graph = import_graph()
    above = {"lessons_lib.moe": ("lessons_lib.model", "lessons_lib.lab", "lessons_lib.course"),
             "lessons_lib.model": ("lessons_lib.lab", "lessons_lib.course")}
    bad = {m: sorted(t for t in targets if t.startswith(above[kind]))
           for m, targets in graph.items() for kind in above if m.startswith(kind)}
    assert not {m: t for m, t in bad.items() if t}
    assert "lessons_lib.moe.layer" in graph["lessons_lib.model.transformer"]


def test_no_import_cycle():
    graph = import_graph()
    # a package importing its own modules (re-exports) is not a cycle through them
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "lessons_lib.lab.profile" in graph["lessons_lib.lab.bench"]  # imported inside main()
    assert "lessons_lib.moe.layer" in graph["lessons_lib.lab.equivalence"]


def test_every_module_names_its_lesson():
    for path in ROOT.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "lesson" in doc.lower() or path.name == "__init__.py" and path.parent == ROOT, path
