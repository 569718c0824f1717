"""The reliability catalog: every `@pytest.mark.fault(area, case, behaviour)` in the tests, as a docs page.

Each fault veralab is tested against carries the marker on its test (or on a `pytest.param`), so the page
`docs/reliability.md` is generated from the collected tests themselves and `tests/test_fault_catalog.py`
fails when the two disagree. Regenerate with:

    python -m pytest tests --collect-only -q --fault-catalog docs/reliability.md
"""

from __future__ import annotations

from dataclasses import dataclass

AREAS = {
    "config": "Configs",
    "model": "Models and adapters",
    "file": "Files on disk",
    "numerics": "Numerical safety",
}
HEADER = """# Reliability: what was tried, and what veralab does

Every row below is a fault or bad input that a test feeds to veralab, with the behaviour the test asserts.
The page is generated from the `@pytest.mark.fault(...)` markers of the tests
(`python -m pytest tests --collect-only -q --fault-catalog docs/reliability.md`), and
`tests/test_fault_catalog.py` fails if it drifts from them. Unless a row says otherwise, after an error the
model's outputs and state dict and the files on disk are exactly as before (the tests check this).
"""


@dataclass(frozen=True)
class Fault:
    area: str
    case: str
    behaviour: str
    test: str  # "file.py::test_name"


def faults_from_items(items) -> list[Fault]:
    """The fault markers of collected pytest items, one row per (marker, test function), in test order."""
    faults: dict[Fault, None] = {}
    for item in items:
        for marker in item.iter_markers("fault"):
            area, case, behaviour = marker.args
            test = f"{item.path.name}::{item.originalname}"
            faults[Fault(area, case, behaviour, test)] = None
    return list(faults)


def render_markdown(faults: list[Fault]) -> str:
    lines = [HEADER]
    for area, title in AREAS.items():
        rows = [f for f in faults if f.area == area]
        if not rows:
            continue
        lines += [f"## {title}", "", "| input or fault | what veralab does | test |", "| --- | --- | --- |"]
        lines += [f"| {_cell(f.case)} | {_cell(f.behaviour)} | `{f.test}` |" for f in rows]
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
