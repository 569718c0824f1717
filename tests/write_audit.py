"""Which files a process writes: the names of the files it opens for writing, or renames into place, under one
directory, seen through a Python audit hook. The multi-process tests use it inside every torchrun process to
check that only rank 0 writes.

    audit = WriteAudit()                # installs the hook (for the life of the process)
    with audit.watch(directory) as writes:
        ...                             # `writes` fills with file names
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class WriteAudit:
    """Records writes under the watched directory (none while nothing is watched)."""

    def __init__(self) -> None:
        self.directory: str | None = None
        self.writes: list[str] = []
        sys.addaudithook(self._audit)  # a hook cannot be removed: `watch` and `start` switch it on

    def start(self, directory: str | os.PathLike) -> list[str]:
        """Watch `directory` from now on; returns the list the names go into."""
        self.directory, self.writes = os.path.abspath(directory), []
        return self.writes

    @contextlib.contextmanager
    def watch(self, directory: str | os.PathLike) -> Iterator[list[str]]:
        writes = self.start(directory)
        try:
            yield writes
        finally:
            self.directory = None

    def _audit(self, event: str, args: tuple) -> None:
        if self.directory is None:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & WRITE_FLAGS:
                self._record(os.fsdecode(args[0]))
        elif event in ("os.rename", "os.replace"):
            self._record(os.fsdecode(args[1]))

    def _record(self, path: str) -> None:
        if os.path.abspath(path).startswith(self.directory):
            self.writes.append(os.path.basename(path))
