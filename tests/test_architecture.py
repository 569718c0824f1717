"""The rings of veralab, checked on the source: arrows point inward only, no cycles, no private reach-ins.

    textbook     veralab.reference                      imports nothing of veralab
    library      veralab.config, veralab.targets,       imports the textbook, never the application
                 veralab.counting, veralab.atomic,
                 veralab.fast
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
            (`veralab.fast.VeraModel` -> `veralab.fast`, `veralab.fast.loading` -> `veralab.fast.loading`).
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
        "    from veralab.fast import get_model, loading",
        "    from . import counting",
        "    from .reference import init_projections",
    ])  # fmt: skip
    assert imported_modules(source, "veralab", set(module_files())) == {
        "veralab.config", "veralab.targets", "veralab.fast", "veralab.fast.loading", "veralab.counting",
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


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_cycle_detection_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_veralab_is_part_of_an_import_cycle():
    assert import_cycles(import_graph()) == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names_defined(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, module globals and `self._x` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
            names.add(node.id)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
            and _private(node.attr)
        ):
            names.add(node.attr)
    return names


def _is_own(value: ast.expr) -> bool:
    """`self`, `cls` or `super()`: the object's own (or its parent class's) private names are its business."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"


def private_names_used_from_outside(tree: ast.Module) -> set[str]:
    """Private names a module reads off something other than `self` / `cls`, or imports by name."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and not _is_own(node.value):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("veralab"):
            used.update(alias.name for alias in node.names if _private(alias.name))
    return used


def test_no_module_reaches_into_another_modules_private_names():
    """A private name (`_x`) of one veralab module is never used by another: modules talk through seams."""
    trees = {module: ast.parse(path.read_text(encoding="utf-8")) for module, path in module_files().items()}
    defined = {module: private_names_defined(tree) for module, tree in trees.items()}
    reach_ins = {}
    for module, tree in trees.items():
        others = set().union(*(names for other, names in defined.items() if other != module))
        # A name defined here as well as elsewhere still counts: the object it is read off may be the other's.
        foreign = private_names_used_from_outside(tree) & others
        if foreign:
            reach_ins[module] = sorted(foreign)
    assert reach_ins == {}


def test_veralab_fast_exports_the_public_api_only():
    """What the README and the docs use; everything else is imported from the module that defines it."""
    import veralab.fast

    assert sorted(veralab.fast.__all__) == sorted([
        "get_model", "VeraModel", "VeraLayer", "VeraLinear", "VeraEmbedding", "VeraConv",
        "AdapterLoadError", "ProjectionMismatchError", "BASE_ROW",
        "VeraTrainer", "VeraTrainerMixin",
    ])  # fmt: skip
    assert all(getattr(veralab.fast, name) is not None for name in veralab.fast.__all__)
