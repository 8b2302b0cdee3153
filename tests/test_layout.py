"""The package's shape: imports point one way, no cycles, no private names across modules, options documented."""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"moecc": "moecc", "moecc.passes": "passes", "moecc.backends": "backends", "moecc.costmodel": "costmodel"}


def _modules() -> dict[str, str]:
    """module name -> file path, for every module of the four packages."""
    found = {}
    for package, folder in PACKAGES.items():
        for name in os.listdir(os.path.join(REPO, folder)):
            if name.endswith(".py"):
                stem = name[:-3]
                found[package if stem == "__init__" else f"{package}.{stem}"] = os.path.join(REPO, folder, name)
    return found


MODULES = _modules()


def _imports(module: str, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for each import of ``module`` inside the project."""
    tree = ast.parse(open(MODULES[module]).read())
    package = module if MODULES[module].endswith("__init__.py") else module.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            for name in names:  # ``from . import ops`` imports a module
                if f"{base}.{name}" in MODULES:
                    out.append((f"{base}.{name}", []))
            if base in MODULES:
                out.append((base, [n for n in names if f"{base}.{n}" not in MODULES]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in MODULES]
    return out


def test_no_import_cycle_at_import_time():
    graph = {m: {target for target, _ in _imports(m, top_level_only=True) if target != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_no_private_name_is_imported_from_another_module():
    offenders = [f"{m}: {name} from {target}" for m in MODULES for target, names in _imports(m, False)
                 for name in names if name.startswith("_") and not name.startswith("__")]
    assert offenders == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("moecc.passes")))
def test_passes_do_not_reach_into_runtime_state(module):
    surface = {"moecc.runtime", "moecc.sessions", "moecc.report", "moecc.backend"}
    assert not {target for target, _ in _imports(module, False)} & surface


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("moecc.costmodel")))
def test_costmodel_depends_on_nothing_else_in_the_project(module):
    assert all(target.startswith("moecc.costmodel") for target, _ in _imports(module, False))


def test_importing_the_costmodel_does_not_import_torch():
    """Only ``moecc calibrate`` measures with torch, inside the functions that measure."""
    names = " ".join(m for m in MODULES if m.startswith("moecc.costmodel"))
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {names.split()!r}]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_every_option_is_documented_in_the_readme():
    from moecc.options import Options

    readme = open(os.path.join(REPO, "README.md")).read()
    missing = [key for key in Options.documented() if f"`{key}`" not in readme]
    assert missing == []


def test_readme_layout_names_every_module_of_the_surface():
    readme = open(os.path.join(REPO, "README.md")).read()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    surface = [m for m in MODULES if m.startswith("moecc.") and m.count(".") == 1 and m not in PACKAGES]
    missing = [m for m in surface if f"{m.split('.')[1]}.py" not in layout]
    assert len(surface) >= 8
    assert missing == []
