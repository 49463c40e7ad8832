"""Import layering of crate_kernels, read from the source with ast (nothing is imported or run).

Layers, bottom up: errors < ops < models (with whitebox, and analysis, its public name) < pipeline < commands. A
top-level module or package not in LAYERS is a command (train, probe, finetune, analyze, hub, ...), and so are the
package's own __init__, which re-exports from the layers below, and the ENTRY_POINTS (ops.tune). Two rules, imports
inside functions counted too: no module imports a layer above its own, and there is no import circle anywhere in the
package. An import edge goes to the module named: `from . import x` to the submodule x where there is one, `from .m
import f` to m (a package's __init__ when m is a package); executing a parent package's __init__ is not an edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "crate_kernels"
ROOT = Path(__file__).resolve().parents[1]
# checkpoint files are read by the models (load_checkpoint) and written by the pipeline: the bottom layer, beside
# errors; whitebox measures models for the commands and uses the pipeline's image constants
LAYERS = {"errors": 0, "checkpoint": 0, "ops": 1, "models": 2, "whitebox": 3, "analysis": 3, "pipeline": 3}
COMMANDS = 4
# commands that live inside a lower layer's package for the name users type (python -m crate_kernels.ops.tune):
# they import downwards like every command, and the rules keep their package from importing them
ENTRY_POINTS = ("crate_kernels.ops.tune",)
LAYER_NAMES = ("errors", "ops", "models", "pipeline", "commands")


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under root/package (a package is its __init__)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of a dotted name that is a module of the package."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def import_edges(module: str, path: Path, modules: dict[str, Path], package: str) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement in the file, at any depth."""
    is_package = path.name == "__init__.py"
    edges = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 >= len(base):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == package or target.startswith(package + "."):
                edges.append((_known(target, modules) or target, node.lineno))
    return edges


def import_graph(root: Path, package: str) -> dict[str, dict[str, list[int]]]:
    """module -> {imported module: the lines importing it} over the package's own modules."""
    modules = find_modules(root, package)
    graph = {}
    for module, path in modules.items():
        graph[module] = {}
        for target, line in import_edges(module, path, modules, package):
            if target != module and line not in graph[module].get(target, []):
                graph[module].setdefault(target, []).append(line)
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    if module in ENTRY_POINTS or len(parts) < 2:
        return COMMANDS
    return LAYERS.get(parts[1], COMMANDS)


def upward_imports(graph: dict[str, dict[str, list[int]]], root: Path) -> list[str]:
    """One line per import statement naming a module in a layer above the importer's."""
    found = []
    for module, targets in sorted(graph.items()):
        for target, lines in sorted(targets.items()):
            for line in sorted(lines) if layer(target) > layer(module) else ():
                found.append(f"{module} ({_where(module, root)}:{line}) -> {target}: "
                             f"{LAYER_NAMES[layer(module)]} imports {LAYER_NAMES[layer(target)]}")
    return found


def _where(module: str, root: Path) -> str:
    path = root.joinpath(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(root))


def import_cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """One circle (first module repeated at the end) per strongly connected component of more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):  # Tarjan's algorithm; the package has few enough modules for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_circle(graph, component) for component in components]


def _circle(graph: dict[str, dict[str, list[int]]], component: set[str]) -> list[str]:
    """The shortest circle through the component's first module, by breadth-first search inside the component."""
    start = min(component)
    parent, frontier = {start: None}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no circle through {start} in {sorted(component)}")


def describe(cycle: list[str], graph: dict[str, dict[str, list[int]]], root: Path) -> str:
    steps = (f"{a} ({_where(a, root)}:{min(graph[a][b])})" for a, b in zip(cycle, cycle[1:]))
    return " -> ".join(steps) + f" -> {cycle[-1]}"


def test_no_module_imports_a_layer_above_its_own():
    found = upward_imports(import_graph(ROOT, PACKAGE), ROOT)
    assert not found, f"{len(found)} imports up the layers ({' < '.join(LAYER_NAMES)}):\n" + "\n".join(found)


def test_no_import_circle_in_the_package():
    graph = import_graph(ROOT, PACKAGE)
    cycles = import_cycles(graph)
    assert not cycles, f"{len(cycles)} import circles:\n" + "\n".join(describe(c, graph, ROOT) for c in cycles)


# The checker itself, on small packages written for the purpose: one that follows the layers, one with a circle
# (through a function-level `from . import x`), one with imports up the layers (absolute and relative).
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


_CLEAN = {
    "crate_kernels/__init__.py": "from . import ops\nfrom .models import Model\n",
    "crate_kernels/errors.py": "class TrainError(Exception):\n    pass\n",
    "crate_kernels/ops/__init__.py": "from .mssa import mssa\n",
    "crate_kernels/ops/backend.py": "import torch\nfrom ..errors import TrainError\n",
    "crate_kernels/ops/mssa/__init__.py": "from .. import backend\nfrom . import triton_v1, variants\n",
    "crate_kernels/ops/mssa/common.py": "from crate_kernels.ops.backend import x\n",
    "crate_kernels/ops/mssa/triton_v1.py": "from .common import tile\n",
    "crate_kernels/ops/mssa/variants.py": "from . import common\n",
    "crate_kernels/models/__init__.py": "from .crate import Model\n",
    "crate_kernels/models/crate.py": "from ..ops import mssa\nfrom crate_kernels import errors\n",
    "crate_kernels/whitebox.py": "from .models.crate import Model\n",
    "crate_kernels/pipeline/__init__.py": "",
    "crate_kernels/pipeline/run.py": "def f():\n    from ..models import crate\n    from .. import whitebox\n",
    "crate_kernels/train/__init__.py": "def main():\n    from ..pipeline.run import f\n",
    "crate_kernels/train/__main__.py": "from . import main\n",
    "crate_kernels/probe.py": "import crate_kernels.train\nfrom .pipeline import run\n",
}


def test_checker_passes_a_package_that_follows_the_layers(tmp_path):
    graph = import_graph(_write(tmp_path, _CLEAN), PACKAGE)
    assert graph["crate_kernels.ops.mssa"] == {"crate_kernels.ops.backend": [1],
                                               "crate_kernels.ops.mssa.triton_v1": [2],
                                               "crate_kernels.ops.mssa.variants": [2]}
    assert graph["crate_kernels.ops.mssa.variants"] == {"crate_kernels.ops.mssa.common": [1]}
    assert graph["crate_kernels.pipeline.run"] == {"crate_kernels.models.crate": [2], "crate_kernels.whitebox": [3]}
    assert graph["crate_kernels.train.__main__"] == {"crate_kernels.train": [1]}
    assert graph["crate_kernels.models.crate"] == {"crate_kernels.ops.mssa": [1], "crate_kernels.errors": [2]}
    assert upward_imports(graph, tmp_path) == [] and import_cycles(graph) == []


def test_checker_prints_a_circle_through_a_function_level_import(tmp_path):
    files = {**_CLEAN, "crate_kernels/ops/mssa/common.py": "def f():\n    from . import variants\n"}
    graph = import_graph(_write(tmp_path, files), PACKAGE)
    assert upward_imports(graph, tmp_path) == []
    cycles = import_cycles(graph)
    assert cycles == [["crate_kernels.ops.mssa.common", "crate_kernels.ops.mssa.variants",
                       "crate_kernels.ops.mssa.common"]]
    assert describe(cycles[0], graph, tmp_path) == (
        "crate_kernels.ops.mssa.common (crate_kernels/ops/mssa/common.py:2) -> "
        "crate_kernels.ops.mssa.variants (crate_kernels/ops/mssa/variants.py:1) -> crate_kernels.ops.mssa.common")


def test_checker_lists_every_import_up_the_layers(tmp_path):
    files = {**_CLEAN,
             "crate_kernels/errors.py": "from .ops.backend import x\n",
             "crate_kernels/models/crate.py": "from ..ops import mssa\n\n\ndef load():\n"
                                              "    from crate_kernels.pipeline.run import f\n\n\ndef save():\n"
                                              "    from ..pipeline import run\n",
             "crate_kernels/ops/backend.py": "import crate_kernels.probe\n"}
    graph = import_graph(_write(tmp_path, files), PACKAGE)
    assert upward_imports(graph, tmp_path) == [
        "crate_kernels.errors (crate_kernels/errors.py:1) -> crate_kernels.ops.backend: errors imports ops",
        "crate_kernels.models.crate (crate_kernels/models/crate.py:5) -> crate_kernels.pipeline.run: "
        "models imports pipeline",
        "crate_kernels.models.crate (crate_kernels/models/crate.py:9) -> crate_kernels.pipeline.run: "
        "models imports pipeline",
        "crate_kernels.ops.backend (crate_kernels/ops/backend.py:1) -> crate_kernels.probe: ops imports commands",
    ]
    assert import_cycles(graph) == [["crate_kernels.models.crate", "crate_kernels.pipeline.run",
                                     "crate_kernels.models.crate"]]  # the upward import closes a circle too


@pytest.mark.parametrize("module, expected", [
    ("crate_kernels", "commands"), ("crate_kernels.errors", "errors"), ("crate_kernels.ops.mssa.triton_v1", "ops"),
    ("crate_kernels.models.vit_mae", "models"), ("crate_kernels.whitebox", "pipeline"),
    ("crate_kernels.checkpoint", "errors"),
    ("crate_kernels.pipeline.data.images", "pipeline"), ("crate_kernels.train.trainer", "commands"),
    ("crate_kernels.hub", "commands"), ("crate_kernels.analyze", "commands"), ("crate_kernels.ops.tune", "commands"),
    ("crate_kernels.ops.tuning", "ops"),
])
def test_layer_of_each_part_of_the_layout(module, expected):
    assert LAYER_NAMES[layer(module)] == expected
