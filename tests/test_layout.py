"""The package's shape, checked from its own code: folders by role, no import cycles, no private
names taken across modules, nobody outside the engine reaching into it, one place that builds the
decode loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent / "src" / "tpllama"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, name taken from it or None) for every import in ``module``, lazy ones too."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("tpllama")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if not target.startswith("tpllama"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None) if sub in MODULES else (target, a.name))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(m) if t in MODULES and t != m and t != "tpllama"} for m in MODULES}


def test_folders_by_role():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert {"engine", "model", "parallel", "weights", "serve", "bench", "kernels"} <= packages
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "cli.py", "config.py", "env.py", "errors.py", "flags.py",
                     "version.py"], loose


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == [], cycles


def test_no_private_names_across_modules():
    taken = [(m, t, n) for m in MODULES for t, n in _imports(m)
             if n is not None and n.startswith("_") and not n.startswith("__")]
    assert taken == [], taken


def test_only_the_engine_touches_its_private_attributes():
    offenders = []
    for module, path in MODULES.items():
        if module.startswith("tpllama.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name == "engine":
                    offenders.append((module, node.lineno, node.attr))
    assert offenders == [], offenders


def test_one_place_builds_the_decode_loop():
    """Only Engine.step calls the runner's forward; the server and the commands call the engine."""
    callers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "forward" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "runner":
                callers.append(module)
    assert set(callers) == {"tpllama.engine.engine"}, callers


@pytest.mark.parametrize("module", ["tpllama.serve.cli", "tpllama.bench.command", "tpllama.bench.quality"])
def test_command_flags_import_nothing_heavy(module):
    """A command's flags load without FastAPI, uvicorn or transformers (so --help works and a
    missing package is named when the command runs)."""
    heavy = {"fastapi", "uvicorn", "transformers", "starlette", "pydantic"}
    tree = ast.parse(MODULES[module].read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert not names & heavy, names & heavy
