"""The project's layout: the core below, the demo and the ComfyUI nodes above it side by side, the ``saeuron``
command on top; each module imports only its own layer or the layers below, and nothing imports in a circle.

Imports are read from the source, lazy ones inside functions and ``if TYPE_CHECKING:`` ones included, so the check
holds for every code path and for the type annotations, not only for what one import happens to load.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "saeuron_core"
PACKAGES = ("saeuron_core", "saeuron_demo", "nodes", "saeuron_cli")
MAX_LINES = 450

# Bottom to top, by module or package (the longest prefix names a module's layer); a module may import its own
# layer (without a circle) and anything below. The demo and the nodes share a layer: neither imports the other.
LAYERS = [
    {"saeuron_core.errors", "saeuron_core.seeds", "saeuron_core.safetensors_io", "saeuron_core.assignments"},
    {"saeuron_core.sae"},
    {"saeuron_core.hosts"},
    {"saeuron_core.concepts", "saeuron_core.data"},
    {"saeuron_core.training", "saeuron_core.erasure"},
    {"saeuron_core.inspection", "saeuron_core"},
    {"saeuron_demo", "nodes"},
    {"saeuron_demo.evaluation"},
    {"saeuron_cli"},
]
#: packages on one layer that must not import each other
TENANTS = {"saeuron_demo": "nodes", "nodes": "saeuron_demo"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """Every module (or package) of the project's packages that ``path`` (or ``source`` read as that file) imports: at
    the top, lazily, or for type checking only."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom):
            base = (package[:len(package) - node.level + 1] if node.level else [])
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] in PACKAGES and (node.level or target.split(".")[0] != "nodes"):
                for alias in node.names:  # `from . import x` may name a submodule
                    sub = f"{target}.{alias.name}"
                    found.add(sub if module_file(sub) else target)
        elif isinstance(node, ast.Import):
            # an absolute ``nodes`` is ComfyUI's module; the pack's own nodes are imported relatively
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES and a.name != "nodes")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text() if source is None else source))
    found.discard(module_name(path))
    return found


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def layer_of(name: str) -> int:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        for i, layer in enumerate(LAYERS):
            if prefix in layer:
                return i
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py; add it")


MODULES = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))
GRAPH = {module_name(p): imports_of(p) for p in MODULES}


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_ones():
    upward = []
    for name, targets in GRAPH.items():
        for target in targets:
            if module_file(target) is None:
                upward.append(f"{name} imports {target}, which does not exist")
            elif layer_of(target) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
            elif TENANTS.get(name.split(".")[0]) == target.split(".")[0]:
                upward.append(f"{name} imports {target}: the demo and the nodes stand side by side")
    assert not upward, "\n".join(upward)


def test_imports_for_type_checking_count():
    source = ("import typing\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .step import TrainStep\n"
              "if typing.TYPE_CHECKING:\n    from ..sae.model import TopKSAE\n")
    assert imports_of(CORE / "training" / "trainer.py", source) == {"saeuron_core.training.step",
                                                                   "saeuron_core.sae.model"}


def test_no_import_circle():
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def walk(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH.get(name, ())):
            if target.count(".") and target.rsplit(".", 1)[0] == name:
                continue  # a package importing its own submodule (re-export) is not a circle
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if state.get(target) is None:
                walk(target)
        path.pop()
        state[name] = 2

    for name in GRAPH:
        if name not in state:
            walk(name)


def test_the_core_and_the_demo_never_import_a_host():
    hosts = ("comfy", "comfy_api", "nodes", "folder_paths", "server")
    for path in [p for p in MODULES if p.relative_to(ROOT).parts[0] in ("saeuron_core", "saeuron_demo")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in hosts for n in names), f"{path}: imports {names}"


CODE = MODULES + sorted(p for folder in ("scripts", "benchmarks") for p in (ROOT / folder).glob("*.py"))
MAX_FUNCTION_LINES = 80


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by what it holds"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: {', '.join(long)} over {MAX_FUNCTION_LINES} lines; split by step"
