"""Every notebook is a pair that never drifts: NN_topic.py (jupytext percent, the source of truth) and
NN_topic.ipynb.

nbval runs the .ipynb and the docs render it, while people edit and review the .py; these tests fail when the
two disagree, when one lacks its pair, or when an .ipynb carries outputs (they are never committed).
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SYNC = (
    "run `jupytext --sync notebooks/*.py` (it takes the cells from whichever file of a pair was edited last)"
)


def _stems(pattern: str) -> set[str]:
    return {path.stem for path in NOTEBOOKS.glob(pattern)}


def _cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


PAIRED = sorted(_stems("*.py") & _stems("*.ipynb"))


def test_every_notebook_has_both_files():
    assert PAIRED, f"no notebook pairs found in {NOTEBOOKS}"
    only_py = sorted(_stems("*.py") - _stems("*.ipynb"))
    only_ipynb = sorted(_stems("*.ipynb") - _stems("*.py"))
    assert not only_py, f"notebooks/{only_py[0]}.py has no .ipynb: {SYNC}"
    assert not only_ipynb, (
        f"notebooks/{only_ipynb[0]}.ipynb has no .py: run `jupytext --to py:percent "
        f"notebooks/{only_ipynb[0]}.ipynb`"
    )


@pytest.mark.parametrize("stem", PAIRED)
def test_py_and_ipynb_hold_the_same_cells(stem):
    from_py = _cells(jupytext.read(NOTEBOOKS / f"{stem}.py"))
    from_ipynb = _cells(nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4))
    assert len(from_py) == len(from_ipynb), (
        f"notebooks/{stem}: the .py has {len(from_py)} cells, the .ipynb {len(from_ipynb)}; {SYNC}"
    )
    for index, (py_cell, ipynb_cell) in enumerate(zip(from_py, from_ipynb, strict=True)):
        assert py_cell == ipynb_cell, f"notebooks/{stem}: cell {index} differs between .py and .ipynb; {SYNC}"


@pytest.mark.parametrize("stem", PAIRED)
def test_committed_ipynb_has_no_outputs(stem):
    notebook = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    with_outputs = [
        i for i, cell in enumerate(notebook.cells) if cell.get("outputs") or cell.get("execution_count")
    ]
    assert not with_outputs, (
        f"notebooks/{stem}.ipynb has outputs in cells {with_outputs}: commit it without them, e.g. `jupyter "
        f"nbconvert --clear-output --inplace notebooks/{stem}.ipynb`"
    )
