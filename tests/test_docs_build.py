"""The documentation site builds in strict mode: a broken link, a missing anchor or reference, or a docstring
mkdocstrings cannot read fails the build, and so this test.

The notebooks are rendered as committed (without running them; nbval runs them), so the build stays fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_strict_without_warnings(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "VERALAB_DOCS_EXECUTE"}
    env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's end-of-life banner, not a build problem
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = build.stdout + build.stderr
    assert build.returncode == 0, output
    assert "WARNING" not in output, output

    # Every notebook became a page, and the API reference holds the documented objects.
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert (site / "notebooks" / notebook.stem / "index.html").is_file(), (
            f"{notebook.name} was not rendered"
        )
    api = {
        page: (site / "api" / page / "index.html").read_text(encoding="utf-8")
        for page in ("reference", "fast")
    }
    assert "init_projections" in api["reference"] and "vera_forward" in api["reference"]
    assert "get_model" in api["fast"] and "VeraModel" in api["fast"]
