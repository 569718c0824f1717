"""The rings of veralab, checked on the source: arrows point inward only.

    textbook     veralab.reference                      imports nothing of veralab
    library      veralab.config, veralab.targets,       imports the textbook, never the application
                 veralab.counting, veralab.fast
    application  veralab.app, and veralab.__main__      imports the library
                 (`python -m veralab` needs it at the package's root)

`import_graph()` reads every module file of veralab/ with `ast`, so nothing is imported to check it. An
import anywhere in a module counts, inside a function too (it runs when the function does); one under
`if TYPE_CHECKING:` does not (it never runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "veralab"
APPLICATION = ("veralab.app", "veralab.__main__")


def module_name(path: Path) -> str:
    """veralab/fast/layer.py -> veralab.fast.layer; veralab/fast/__init__.py -> veralab.fast."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, Path]:
    """Every module of veralab by name, from the files under veralab/."""
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def within(module: str, package: str) -> bool:
    """`module` is `package` or anything in it."""
    return module == package or module.startswith(package + ".")


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
    return name == "TYPE_CHECKING"


class _ImportedNames(ast.NodeVisitor):
    """The dotted names a module's import statements name, relative ones made absolute.

    `import a.b` names a.b; `from a import b` names a.b, whether b is a module or a name in a.
    """

    def __init__(self, package: str) -> None:
        self.package = package
        self.names: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for statement in node.orelse:  # the else branch does run
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # from . import x, from ..y import z
            anchor = self.package.split(".")[: len(self.package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        else:
            base = node.module
        self.names.update(f"{base}.{alias.name}" for alias in node.names)


def imported_modules(source: str, package: str, modules: set[str]) -> set[str]:
    """The modules among `modules` that `source` imports at run time.

    Args:
        source: a module's source text.
        package: the package the module is in (the module itself for an `__init__.py`): the anchor of
            relative imports.
        modules: the known module names; a dotted name counts as the innermost of them it lies in
            (`veralab.fast.VeraModel` -> `veralab.fast`, `veralab.fast.io` -> `veralab.fast.io`).
    """
    collector = _ImportedNames(package)
    collector.visit(ast.parse(source))
    found = set()
    for name in collector.names:
        parts = name.split(".")
        prefixes = (".".join(parts[:end]) for end in range(len(parts), 0, -1))
        innermost = next((prefix for prefix in prefixes if prefix in modules), None)
        if innermost is not None:
            found.add(innermost)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the veralab modules it imports}, for every module file of veralab/ (no self-edges)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = imported_modules(path.read_text(encoding="utf-8"), package, set(files)) - {module}
    return graph


def loaded_by_importing(module: str, graph: dict[str, set[str]]) -> set[str]:
    """Every veralab module `import module` runs: what it imports, transitively, with their packages."""
    loaded, pending = set(), [module]
    while pending:
        current = pending.pop()
        if current in loaded:
            continue
        loaded.add(current)
        parts = current.split(".")
        packages = {".".join(parts[:end]) for end in range(1, len(parts))}  # run first, before the submodule
        pending.extend((graph.get(current, set()) | packages) - loaded)
    return loaded


def test_import_collection_counts_imports_in_functions_and_skips_type_checking_ones():
    source = "\n".join([
        "import torch",
        "import veralab.config",
        "from typing import TYPE_CHECKING",
        "if TYPE_CHECKING:",
        "    from veralab.fast.model import VeraModel",
        "else:",
        "    from veralab import targets",
        "def count():",
        "    from veralab.fast import get_model, io",
        "    from . import counting",
        "    from .reference import init_projections",
    ])  # fmt: skip
    assert imported_modules(source, "veralab", set(module_files())) == {
        "veralab.config", "veralab.targets", "veralab.fast", "veralab.fast.io", "veralab.counting",
        "veralab.reference",
    }  # fmt: skip


def test_the_graph_holds_every_ring_and_the_imports_inside_functions():
    graph = import_graph()
    assert {"veralab", "veralab.reference", "veralab.fast", "veralab.app", "veralab.app.cli"} <= set(graph)
    # cli imports these inside the commands that need them.
    assert {"veralab.app.base_model", "veralab.counting", "veralab.fast"} <= graph["veralab.app.cli"]


def test_reference_imports_nothing_of_veralab():
    assert import_graph()["veralab.reference"] == set()


def test_the_library_never_imports_the_application():
    graph = import_graph()
    in_application = [module for module in graph if any(within(module, app) for app in APPLICATION)]
    offenders = {
        module: sorted(imported for imported in imports if imported in in_application)
        for module, imports in graph.items()
        if module not in in_application
    }
    assert {module: imported for module, imported in offenders.items() if imported} == {}


def test_import_veralab_loads_neither_fast_nor_the_application():
    loaded = loaded_by_importing("veralab", import_graph())
    heavy = ("veralab.fast", *APPLICATION)
    assert sorted(module for module in loaded if any(within(module, package) for package in heavy)) == []
