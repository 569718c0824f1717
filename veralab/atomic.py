"""Atomic updates of a set of files in a directory that may hold other files too.

An adapter directory holds adapter_config.json and adapter_model.safetensors, which must always belong
together, and may also hold other adapters' subdirectories, a README, a Trainer checkpoint's files: the
directory cannot be swapped as a whole. So an update is staged and committed:

1. under an exclusive advisory lock on the directory (`fcntl.flock` on the directory itself, so no lock
   file is left behind), any unfinished earlier update is recovered (see below);
2. the new files are written into `<directory>/.veralab-staging/` and fsynced;
3. a commit marker is written (to a temporary name, fsynced, renamed): from here on the update counts as
   done;
4. each staged file replaces its predecessor (`os.replace`), files the update retires are deleted, the
   directory is fsynced, and the staging directory removed (its marker last).

A process killed at any instant leaves either no marker (the old files are all intact; the staging
directory is deleted by the next update or read) or a marker (the new files are complete in the staging
directory or already in place; the next update or read finishes moving them). Readers (`reading`) hold a
shared lock, so they never see an update half done; one that finds an interrupted update recovers it
first, or, when it cannot (e.g. a read-only directory) and the update had been committed, raises
`UnfinishedUpdateError` instead of reading a mix of old and new files.

Locking is advisory and needs `fcntl` (Linux, macOS) and a filesystem that supports `flock`; elsewhere
updates are still staged and recovered, only not serialized against concurrent readers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

STAGING_NAME = ".veralab-staging"
COMMIT_MARKER = "COMMITTED"
# Staging directories of veralab versions before this protocol: `.<directory name>.saving-<random>`.
LEGACY_STAGING_INFIX = ".saving-"


class UnfinishedUpdateError(OSError):
    """A committed update of a directory was interrupted and cannot be finished here (e.g. read-only)."""


def update_files(
    directory: str | os.PathLike,
    files: dict[str, bytes],
    retire: Callable[[str], bool] | None = None,
) -> None:
    """Replace `files` ({name: bytes}) in `directory` together: afterwards all are new, or none is.

    Args:
        directory: the directory (created with its parents when missing; removed again if the update fails
            before anything else was put in it).
        files: the files' names (plain names, no subdirectories) and contents.
        retire: names of files already in the directory that the update deletes (e.g. the shards of an
            earlier model), unless the update writes them.
    """
    with staged_update(directory, retire) as staging:
        for name, data in files.items():
            with open(staging / name, "wb") as f:
                f.write(data)


@contextlib.contextmanager
def staged_update(
    directory: str | os.PathLike, retire: Callable[[str], bool] | None = None
) -> Iterator[Path]:
    """Yield a staging directory to write the new files into; they replace their predecessors together.

    Files written into the staging directory (plain files only) are fsynced, committed and moved into
    `directory` when the block ends without an error; on an error (KeyboardInterrupt included) the staging
    directory is deleted and `directory` is as before.

    Args:
        directory: the directory to update (created with its parents when missing).
        retire: see `update_files`.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _lock(directory, exclusive=True):
            recover(directory)
            staging = directory / STAGING_NAME
            staging.mkdir()
            try:
                yield staging
                _commit(directory, staging, retire)
            except BaseException:
                if not (staging / COMMIT_MARKER).exists():
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            _roll_forward(directory, staging)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # only when nothing else is in it
                directory.rmdir()
        raise


@contextlib.contextmanager
def reading(directory: str | os.PathLike) -> Iterator[None]:
    """Hold a shared lock on `directory` while its files are read: no update is half done meanwhile.

    An interrupted update found there is recovered first (finished, or discarded if it was not committed).

    Raises:
        UnfinishedUpdateError: a committed update cannot be finished (the directory is not writable); its
            files would be a mix of old and new ones.
    """
    directory = Path(directory)
    if fcntl is None or not directory.is_dir():
        if directory.is_dir():
            _recover_or_raise(directory)
        yield
        return
    fd = _open_directory(directory)
    try:
        _flock(fd, fcntl.LOCK_SH)
        while _unfinished(directory):
            _flock(fd, fcntl.LOCK_EX)  # recovering writes: exclusive (readers may race to it)
            recovered = _recover_or_raise(directory)
            _flock(fd, fcntl.LOCK_SH)
            if not recovered:
                break  # an uncommitted update that cannot be cleaned away: the old files are intact
        yield
    finally:
        os.close(fd)  # releases the lock


def recover(directory: Path) -> None:
    """Finish a committed update of `directory`, or delete an uncommitted one (call under the exclusive
    lock)."""
    staging = directory / STAGING_NAME
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
    elif staging.is_dir():
        if (staging / COMMIT_MARKER).is_file():
            _roll_forward(directory, staging)
        else:
            shutil.rmtree(staging)
    for entry in directory.iterdir():
        if entry.name.startswith(f".{directory.name}{LEGACY_STAGING_INFIX}") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _unfinished(directory: Path) -> bool:
    return os.path.lexists(directory / STAGING_NAME)


def _recover_or_raise(directory: Path) -> bool:
    """Recover; False when an uncommitted update cannot be deleted (harmless: the old files are intact)."""
    committed = (directory / STAGING_NAME / COMMIT_MARKER).is_file()
    try:
        recover(directory)
    except OSError as e:
        if committed:
            raise UnfinishedUpdateError(
                e.errno,
                f"{directory}: an update of this directory was interrupted after it was committed and cannot "
                f"be finished here ({e.strerror or e}); its files are a mix of old and new ones. Open it "
                "once with write access (any veralab save or load there finishes the update), or save the "
                "adapter again",
            ) from e
        return False
    return True


def _commit(directory: Path, staging: Path, retire: Callable[[str], bool] | None) -> None:
    names = sorted(entry.name for entry in staging.iterdir())
    for name in names:
        path = staging / name
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path}: an atomic update holds plain files only, not {name!r}")
        _fsync_file(path)
    retired = sorted(
        entry.name
        for entry in directory.iterdir()
        if retire is not None and entry.name not in names and entry.is_file() and retire(entry.name)
    )
    marker = staging / (COMMIT_MARKER + ".tmp")
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"retire": retired}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_directory(staging)  # the staged files' names are durable before the marker appears
    os.replace(marker, staging / COMMIT_MARKER)
    _fsync_directory(staging)


def _roll_forward(directory: Path, staging: Path) -> None:
    marker = staging / COMMIT_MARKER
    try:
        retired = json.loads(marker.read_text(encoding="utf-8"))["retire"]
    except (OSError, ValueError, KeyError, TypeError):
        retired = []  # only files the update deletes are lost track of; the new files still move in
    for entry in sorted(staging.iterdir()):
        if entry.name not in (COMMIT_MARKER, COMMIT_MARKER + ".tmp"):
            os.replace(entry, directory / entry.name)
    for name in retired:
        if isinstance(name, str) and name == Path(name).name and name not in ("", ".", ".."):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
    _fsync_directory(directory)
    with contextlib.suppress(FileNotFoundError):
        (staging / (COMMIT_MARKER + ".tmp")).unlink()
    marker.unlink()
    staging.rmdir()


@contextlib.contextmanager
def _lock(directory: Path, exclusive: bool) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = _open_directory(directory)
    try:
        _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _open_directory(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _flock(fd: int, operation: int) -> None:
    with contextlib.suppress(OSError):  # a filesystem without flock (some network ones): go on unlocked
        fcntl.flock(fd, operation)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
