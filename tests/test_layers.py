"""The layering of the package, read from the source (every import statement, also those inside functions).

Layers, lowest first (README, "Layout"): ``rgkern.kernels`` (Triton kernels) <- ``rgkern.core``
<- ``rgkern.locality`` <- ``rgkern.tools`` <- ``rgkern.cli``; ``rgkern.data`` is a leaf that
tools and cli use. ``rgkern.core.errors``, ``rgkern.core.precision`` and ``rgkern.core.cache`` import nothing
from rgkern, so the kernels may use them and the data loaders errors. Nothing imports upward,
nothing below the CLI imports argparse or the CLI, and no two classes share a name.
"""
import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each top-level package's source lives (pyproject.toml: [tool.setuptools] package-dir).
SOURCES = {"rgkern": ROOT / "rgkern", "rgkern.kernels": ROOT / "kernels"}

# What each layer may import from rgkern (itself included).
ALLOWED = {
    "rgkern.kernels": {"rgkern.kernels", "rgkern.core.precision", "rgkern.core.errors", "rgkern.core.cache"},
    "rgkern.data": {"rgkern.data", "rgkern.core.errors"},
    "rgkern.core": {"rgkern.core", "rgkern.kernels"},
    "rgkern.locality": {"rgkern.locality", "rgkern.core"},
    "rgkern.tools": {"rgkern.tools", "rgkern.locality", "rgkern.core", "rgkern.data"},
    "rgkern.cli": {"rgkern.cli", "rgkern.tools", "rgkern.locality", "rgkern.core", "rgkern.data"},
}
# The bottom of core: modules that import nothing from rgkern.
STANDALONE = {"rgkern.core.errors", "rgkern.core.precision", "rgkern.core.cache"}
# The package itself re-exports the public API from every layer, ``python -m rgkern``
# (rgkern/__main__.py) is the command line's entry point, and ``rgkern.checkpoint`` is the
# checkpoint facade of docs/design.md section 6.
TOP = {"rgkern": None, "rgkern.__main__": {"rgkern.cli"}, "rgkern.checkpoint": {"rgkern.tools"}}


def discover(sources: dict) -> dict:
    """``{module name: (path, is_package)}`` for every .py file under the source folders."""
    modules = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([package] + parts)] = (path, is_package)
    return modules


def imports_of(name: str, path: Path, is_package: bool, known: set) -> list:
    """``(line, imported module)`` for every import in the file, relative ones resolved.

    ``from X import y`` counts as importing ``X.y`` when that is a module, else ``X``.
    """
    found = []
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                child = f"{module}.{alias.name}"
                found.append((node.lineno, child if child in known else module))
    return found


def layer_of(module: str):
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def within(module: str, prefixes) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def violations(sources: dict) -> list:
    """Every break of the rules above, as readable strings (empty when the tree keeps them)."""
    modules = discover(sources)
    known = set(modules)
    problems = []
    classes = collections.defaultdict(list)
    for name, (path, is_package) in modules.items():
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes[node.name].append(f"{where}:{node.lineno}")
        layer = layer_of(name)
        if layer is None and name not in TOP:
            problems.append(f"{where}: module {name} is in no layer")
        for line, imported in sorted(set(imports_of(name, path, is_package, known))):
            top = imported.split(".")[0]
            in_cli = layer == "rgkern.cli" or name == "rgkern.__main__"
            if not in_cli and (top == "argparse" or within(imported, ["rgkern.cli"])):
                problems.append(f"{where}:{line}: {name} imports {imported} (only the CLI may)")
            if top != "rgkern" or within(imported, [name]):
                continue
            if name in STANDALONE:
                problems.append(f"{where}:{line}: {name} imports {imported}; it must import nothing from rgkern")
            elif name in TOP:
                allowed = TOP[name]
                if allowed is not None and not within(imported, allowed):
                    problems.append(f"{where}:{line}: {name} imports {imported}")
            elif layer is not None and not within(imported, ALLOWED[layer]):
                problems.append(
                    f"{where}:{line}: {name} ({layer}) imports {imported}, which is not below it "
                    f"(allowed: {', '.join(sorted(ALLOWED[layer]))})"
                )
    for class_name, places in sorted(classes.items()):
        if len(places) > 1:
            problems.append(f"class {class_name} is defined {len(places)} times: {', '.join(places)}")
    return problems


def test_the_package_keeps_its_layers():
    assert discover(SOURCES), "no modules found"
    problems = violations(SOURCES)
    assert problems == [], "\n".join(problems)


def test_every_layer_is_a_folder_with_modules():
    modules = discover(SOURCES)
    for layer in ALLOWED:
        assert layer in modules and modules[layer][1], f"{layer} is not a package"
    for name in STANDALONE:
        assert name in modules, name


def write(root: Path, files: dict) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_finds_each_kind_of_violation(tmp_path):
    """The rules can fail: a small tree that breaks each of them once."""
    package, kernels = tmp_path / "rgkern", tmp_path / "kernels"
    write(tmp_path, {
        "rgkern/__init__.py": "",
        "rgkern/stray.py": "",
        "kernels/__init__.py": "",
        "kernels/op.py": "from rgkern.core import model\n",
        "rgkern/core/__init__.py": "",
        "rgkern/core/errors.py": "from . import model\n",
        "rgkern/core/precision.py": "",
        "rgkern/core/model.py": "def f():\n    from ..tools import train\n\nclass Coupling:\n    pass\n",
        "rgkern/data/__init__.py": "from rgkern.core import model\n",
        "rgkern/locality/__init__.py": "",
        "rgkern/locality/inpaint.py": "import argparse\nfrom .. import cli\n",
        "rgkern/tools/__init__.py": "",
        "rgkern/tools/train.py": "from rgkern.cli.options import positive_int\nfrom .. import RGFlow\n",
        "rgkern/cli/__init__.py": "import argparse\nfrom ..tools import train\n",
        "rgkern/cli/other.py": "class Coupling:\n    pass\n",
    })
    problems = "\n".join(violations({"rgkern": package, "rgkern.kernels": kernels}))
    expected = [
        "module rgkern.stray is in no layer",
        "rgkern.kernels.op (rgkern.kernels) imports rgkern.core.model",
        "rgkern.core.errors imports rgkern.core.model; it must import nothing from rgkern",
        "rgkern.core.model (rgkern.core) imports rgkern.tools.train",
        "rgkern.data (rgkern.data) imports rgkern.core.model",
        "rgkern.locality.inpaint imports argparse (only the CLI may)",
        "rgkern.locality.inpaint imports rgkern.cli (only the CLI may)",
        "rgkern.tools.train imports rgkern.cli.options (only the CLI may)",
        "rgkern.tools.train (rgkern.tools) imports rgkern,",
        "class Coupling is defined 2 times",
    ]
    for text in expected:
        assert text in problems, f"{text!r} not reported in:\n{problems}"
    assert "rgkern/cli/__init__.py" not in problems  # the CLI may import argparse and tools


@pytest.mark.parametrize("module", ["rgkern.core.errors", "rgkern.core.precision", "rgkern.core.cache"])
def test_standalone_modules_import_without_the_rest_of_rgkern(module):
    modules = discover(SOURCES)
    path, is_package = modules[module]
    imported = [m for _, m in imports_of(module, path, is_package, set(modules))]
    assert not [m for m in imported if m.split(".")[0] == "rgkern"]
