"""What every notebook owes a learner, checked on its source (notebooks/NN_topic.py), for every notebook
found, so that a new one cannot forget it:

- it ends with an exercise whose worked solution is checked by a `veralab.exercises` checker in an assert
  cell (nbval runs it, so the checker is tested on a right answer);
- its last Markdown cell links to the next notebook, and the last notebook links back to the learning path;
- its code fits the site's page: no code line is longer than 88 characters;
- the notebooks with knobs a learner wants to move have an `ipywidgets` control whose callback an assert
  cell exercises, and a static figure at the default values for the site and for nbval;
- exactly the cells that build or move a control are tagged `widget`: the site's build skips them
  (scripts/mkdocs_hooks.py), so an untagged one would run there, and a tagged one would be missing.
"""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
WITH_WIDGETS = ("01", "02", "03", "04", "05", "08", "09")
CODE_WIDTH = 88


def cells(path: Path):
    return jupytext.read(path).cells


def test_the_notebooks_are_found_and_numbered_without_gaps():
    numbers = [int(path.name[:2]) for path in SOURCES]
    assert len(numbers) >= 9 and numbers == list(range(1, len(numbers) + 1)), numbers


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.stem)
def test_ends_with_an_exercise_checked_by_a_checker(path):
    notebook = cells(path)
    headings = [
        i for i, cell in enumerate(notebook) if cell.cell_type == "markdown" and "## Exercise" in cell.source
    ]
    assert headings, f"{path.name} has no '## Exercise' section"
    after = notebook[headings[-1] :]
    checks = [
        cell.source
        for cell in after
        if cell.cell_type == "code" and "exercises.check_" in cell.source and "assert " in cell.source
    ]
    assert checks, f"{path.name}: its exercise has no cell asserting an `exercises.check_...(...)` result"
    solutions = [cell for cell in after if cell.cell_type == "code" and "Worked solution" in cell.source]
    assert solutions, f"{path.name}: the exercise's solution cell is not marked '# Worked solution'"
    assert all(cell.metadata.get("jupyter", {}).get("source_hidden") for cell in solutions), (
        f"{path.name}: the worked solution should start collapsed (jupyter.source_hidden)"
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.stem)
def test_the_last_markdown_cell_links_to_the_next_notebook(path):
    last = [cell for cell in cells(path) if cell.cell_type == "markdown"][-1].source
    index = SOURCES.index(path)
    if index + 1 < len(SOURCES):
        target = f"({SOURCES[index + 1].stem}.ipynb)"
        assert target in last and "Next" in last, f"{path.name} should end with 'Next: [...]{target}'"
    else:
        assert "(../docs/index.md" in last, (
            f"{path.name}, the last notebook, should link back to the learning path, ../docs/index.md"
        )


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.stem)
def test_code_fits_the_page(path):
    long = [
        line
        for cell in cells(path)
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if len(line) > CODE_WIDTH
    ]
    assert not long, f"{path.name}: {len(long)} code lines over {CODE_WIDTH} characters, e.g. {long[0]!r}"


@pytest.mark.parametrize("number", WITH_WIDGETS)
def test_has_a_widget_with_a_static_fallback_and_a_tested_callback(number):
    (path,) = [path for path in SOURCES if path.name.startswith(number)]
    code = [cell.source for cell in cells(path) if cell.cell_type == "code"]
    assert any("ipywidgets" in source for source in code), f"{path.name} has no ipywidgets control"
    drawn = re.findall(r"widgets\.interactive\(\s*(\w+)", "\n".join(code))
    assert drawn, f"{path.name}: no widgets.interactive(function, ...) control"
    # The static fallback: the same function called at its default values, outside the widget.
    assert any(re.search(rf"^{name}\(\)", source, re.M) for name in drawn for source in code), (
        f"{path.name}: no cell calls {drawn[0]}() at its defaults, the figure the site and nbval show"
    )
    # The callback runs under nbval: an assert cell moves the control and checks what it redrew.
    assert any(re.search(r"\.value = ", source) and "assert" in source for source in code), (
        f"{path.name}: no assert cell sets a control's value and checks the result"
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.stem)
def test_exactly_the_cells_that_build_or_move_a_control_are_tagged_widget(path):
    code = [cell for cell in cells(path) if cell.cell_type == "code"]
    controls = {name for cell in code for name in re.findall(r"^(\w+) = widgets\.", cell.source, re.M)}
    for cell in code:
        uses = re.search(r"\bwidgets\.\w+\(", cell.source) or any(
            re.search(rf"\b{name}\b", cell.source) for name in controls
        )
        tagged = "widget" in cell.metadata.get("tags", [])
        problem = "uses a control, untagged" if uses else "is tagged 'widget' but uses no control"
        first_line = cell.source.strip().splitlines()[0]
        assert bool(uses) == tagged, f"{path.name}: the cell starting {first_line!r} {problem}"
