"""docs/reliability.md is generated from the tests' fault markers and must not drift from them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reliability.md"


def test_reliability_page_matches_the_tests(tmp_path):
    generated = tmp_path / "reliability.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--fault-catalog",
            str(generated),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = generated.read_text(encoding="utf-8")
    for area in ("## Configs", "## Models and adapters"):
        assert area in text
    assert PAGE.exists() and PAGE.read_text(encoding="utf-8") == text, (
        "docs/reliability.md is out of date with the fault markers in tests/; regenerate it with `python -m "
        "pytest tests --collect-only -q --fault-catalog docs/reliability.md`"
    )
