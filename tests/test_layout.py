"""The package layout: no import cycle between sqdist modules, no module over 450 lines,
and every command (``python -m sqdist.train|export|compress|ptq|slurm``) answers ``--help``.

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import``
at module level and inside functions (lazy imports count), relative imports resolved. An edge
goes to the module named (``from .quant import weights`` names ``sqdist.quant.weights`` when that
is a module, else ``sqdist.quant``); the parent packages a module's import runs are not edges
(a package ``__init__`` importing its submodules and a submodule importing a sibling is fine).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sqdist"
MAX_LINES = 450


def module_files() -> dict[str, Path]:
    """``{"sqdist.quant.weights": path, "sqdist.quant": .../quant/__init__.py, ...}``."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The sqdist modules that module ``name`` (file ``path``) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            # `from X import y` imports X.y when that is a module, else the attribute y of X
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import sqdist.quant.weights as w`: a module; a.b.attr: a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_reads_relative_and_lazy_imports():
    graph = import_graph()
    assert "sqdist.quant.registry" in graph["sqdist.quant.weights"]  # from .registry import ...
    assert "sqdist.quant.kernels" in graph["sqdist.quant.weights"]  # from . import kernels, inside a method
    assert "sqdist.nn" in graph["sqdist.export.deployable"]  # from ..nn import SQLayer, inside a function
    assert "sqdist.export" in graph["sqdist"]  # the lazy __getattr__ of the top package
    assert "sqdist.version" in graph["sqdist.train.build"]  # from ..version import __version__


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_450_lines():
    long = {str(path.relative_to(ROOT)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("command", ["train", "export", "compress", "ptq", "slurm"])
def test_command_help(command):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", f"sqdist.{command}", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower(), proc.stdout[-2000:]


# --- private names stay inside their package ----------------------------------------------------

PLUGINS = ROOT / "plugins"


def is_private(name: str) -> bool:
    """``_x`` is private; a dunder (``__version__``) is not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def unit(module: str) -> str:
    """The package a module belongs to for privacy: ``sqdist.quant.kernels._build`` -> ``sqdist.quant``;
    a top-level module is its own unit (``sqdist.nn``), and a private top-level module (``sqdist._version``)
    belongs to the top package ``sqdist``."""
    parts = module.split(".")
    if len(parts) < 2 or is_private(parts[1]):
        return parts[0]
    return ".".join(parts[:2])


def private_imports(name: str, path: Path, modules: dict[str, Path], owner: str | None = None) -> list[str]:
    """Private names module ``name`` (file ``path``) takes from another sqdist unit: ``from X import _y``,
    ``import X._y``, ``from X._y import z`` and ``m._y`` where ``m`` was bound to a module of another unit.
    ``owner`` is the importer's unit (default: ``unit(name)``; a plugin passes ``"plugin"``)."""
    owner = owner or unit(name)
    is_package = path.name == "__init__.py"
    found, aliases = [], {}
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            if stem.split(".")[0] != "sqdist":
                continue
            for alias in node.names:
                full = f"{stem}.{alias.name}"
                if unit(full if full in modules else stem) == owner:
                    continue
                if any(is_private(p) for p in full.split(".")):
                    found.append(f"{name}:{node.lineno} from {stem} import {alias.name}")
                elif full in modules:
                    aliases[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "sqdist" or unit(alias.name) == owner:
                    continue
                if any(is_private(p) for p in alias.name.split(".")):
                    found.append(f"{name}:{node.lineno} import {alias.name}")
                elif alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and is_private(node.attr)):
            found.append(f"{name}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    return found


def plugin_files() -> dict[str, Path]:
    """``{"sqdist_slb": path, "sqdist_srq.fast": path, ...}``: the modules of every plugin under plugins/."""
    out = {}
    for package in sorted(PLUGINS.glob("*/sqdist_*")):
        for path in sorted(package.rglob("*.py")):
            parts = list(path.relative_to(package.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def test_private_import_check_catches_each_form(tmp_path):
    modules = module_files()
    src = tmp_path / "walk.py"
    src.write_text("from ..compress.walk import _world, calibration_chunks\n"
                   "from .. import _version\n"
                   "from .._version import __version__\n"
                   "from ..nn import SQLayer\n"
                   "from .calib import _local\n"
                   "import sqdist.quant.kernels._build\n"
                   "from ..compress import walk\n"
                   "def f():\n    return walk._broadcast, walk.calibration_chunks\n")
    found = private_imports("sqdist.ptq.walk", src, modules)
    assert [f.split(" ", 1)[1] for f in found] == [
        "from sqdist.compress.walk import _world", "from sqdist import _version",
        "from sqdist._version import __version__", "import sqdist.quant.kernels._build",
        "sqdist.compress.walk._broadcast"], found
    # the owner may use its own private names, and the top package its private modules
    assert private_imports("sqdist.ptq.walk", src, modules, owner="sqdist.ptq")[:1] == found[:1]
    assert not private_imports("sqdist", PACKAGE / "__init__.py", modules)
    plugin = tmp_path / "plug.py"
    plugin.write_text("from sqdist.quant.kernels._build import load_source\nfrom sqdist import Quantizer\n")
    assert len(private_imports("sqdist_x", plugin, modules, owner="plugin")) == 1


def test_no_private_name_crosses_a_package_line():
    modules = module_files()
    found = [f for name, path in modules.items() for f in private_imports(name, path, modules)]
    found += [f for name, path in plugin_files().items() for f in private_imports(name, path, modules, owner="plugin")]
    assert not found, "private names imported across a package line (make them public in their owner):\n" + \
        "\n".join(found)
