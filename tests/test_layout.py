"""The package's layout as docs/architecture.md draws it: no import circle, the engine, the config and export
know no method, few modules at the top, short classes and modules, and every docs/scripts file's imports
resolve (a renamed function breaks its script here, not in a reader's hands)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "loracl"
SCRIPTS = Path(__file__).resolve().parent.parent / "docs" / "scripts"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The loracl modules `name` imports, anywhere in its file (late imports too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("loracl")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("loracl"):
                continue
            for a in node.names:  # `from . import register` imports the package; `from .x import y` module x
                sub = f"{target}.{a.name}"
                out.add(sub if sub in modules else target)
    return {m for m in out if m in modules and m != name}


def test_no_import_circle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_engine_config_and_export_know_no_method():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("loracl.engine") or name in ("loracl.config", "loracl.runs.export"):
            bad = {m for m in _imports(name, path, modules) if m.startswith("loracl.methods")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_few_top_level_modules_short_classes_and_modules():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, top
    for path in PKG.rglob("*.py"):
        lines = path.read_text().splitlines()
        assert len(lines) <= 400, f"{path.relative_to(PKG)}: {len(lines)} lines"
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.ClassDef):
                n = node.end_lineno - node.lineno + 1
                assert n <= 250, f"{path.relative_to(PKG)}: class {node.name} is {n} lines"


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_docs_scripts_compile_and_their_imports_resolve(script, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # as `python docs/scripts/X.py` runs it: its siblings import
    tree = ast.parse((SCRIPTS / script).read_text())
    compile(tree, script, "exec")
    imports = ast.Module(body=[n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                               and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")],
                         type_ignores=[])
    exec(compile(imports, script, "exec"), {})
