"""The documentation site's build, started in the background as soon as the tests are collected.

Building the site executes every notebook (scripts/mkdocs_hooks.py), a few CPU-minutes. The unit tests run
on one thread, so on a two-core machine the build runs beside them, one notebook at a time on the other
core, and is usually done when tests/test_docs_build.py (which runs last) needs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 1800


@dataclass
class SiteBuild:
    """A running (or finished) `mkdocs build --strict` into `site`, its output going to `log`."""

    folder: Path
    process: subprocess.Popen

    @property
    def site(self) -> Path:
        return self.folder / "site"

    @property
    def log(self) -> Path:
        return self.folder / "build.log"

    def wait(self) -> tuple[int, str]:
        """Wait for the build; returns its exit status and its output."""
        try:
            returncode = self.process.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return returncode, self.log.read_text(encoding="utf-8")

    def stop(self) -> None:
        """End the build and the notebook kernels it started (its own process group), if still running."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


SITE_BUILD = pytest.StashKey[SiteBuild]()
SITE_SCREENSHOTS = pytest.StashKey[Path]()  # the browser test's screenshots, named in the terminal summary


def start_site_build(workers: int = 1) -> SiteBuild:
    """Start `mkdocs build --strict` (notebooks executed) into a new temporary folder.

    Args:
        workers: how many notebooks run at a time.
    """
    folder = Path(tempfile.mkdtemp(prefix="veralab-site-"))
    env = {key: value for key, value in os.environ.items() if key != "VERALAB_DOCS_EXECUTE"}
    env["VERALAB_DOCS_WORKERS"] = str(workers)
    env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's end-of-life banner, not a build problem
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(folder / "build.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder / "site")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the kernels with it
        )
    return SiteBuild(folder, process)
