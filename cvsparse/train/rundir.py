"""A run folder has one run and one writer.

:func:`check_writable` and :func:`check_free` run before any data is loaded: the folder (or the
nearest folder that exists above it) must be a writable folder, and a folder holding another
run's files is refused unless the caller asked to overwrite it.  :class:`RunLock` makes
concurrent writers impossible: ``run.lock`` holds the writer's PID under an exclusive
``flock``, which the kernel releases when the process dies, so the lock of a dead process
(``kill -9``) is taken over by the next run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME
from .curve import CURVE_NAME

LOCK_NAME = "run.lock"
#: What a run writes into its folder (``--overwrite`` removes exactly these).
RUN_FILES = (CHECKPOINT_NAME, PREVIOUS_NAME, CHECKPOINT_NAME + ".tmp", "report.json",
             "report.json.tmp", "metrics.csv", "metrics.csv.tmp", CURVE_NAME, CURVE_NAME + ".tmp",
             "plots")


class RunDirError(ValueError):
    """The output folder cannot be used (not writable, another run's, in use)."""


def check_writable(folder: str | Path) -> None:
    """RunDirError unless ``folder`` is a writable folder or can be created as one."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"output folder {folder} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"cannot create output folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"output folder {folder} is not writable ({existing} is read-only)")


def other_run_files(folder: str | Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``folder``."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def check_free(folder: str | Path, overwrite: bool) -> None:
    """RunDirError if ``folder`` holds another run's files and ``overwrite`` is off."""
    found = other_run_files(folder)
    if found and not overwrite:
        raise RunDirError(f"output folder {folder} holds another run ({', '.join(found)}); "
                          "pass --overwrite to replace it, --resume to continue it, or choose "
                          "another --out")


def clear(folder: str | Path) -> None:
    """Remove every file of :data:`RUN_FILES` from ``folder`` (other files stay)."""
    for name in other_run_files(folder):
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_unlocked(folder: str | Path) -> None:
    """RunDirError (naming the PID) if a live process holds ``folder``'s lock right now."""
    with RunLock(folder, create=False):
        pass


class RunLock:
    """An exclusive lock on a run folder (``run.lock`` holding the PID); a context manager.

    Acquiring creates the folder.  RunDirError (naming the PID) if a live process holds it.
    """

    def __init__(self, folder: str | Path, *, create: bool = True) -> None:
        """``create=False``: only probe an existing lock file (nothing is created, and a
        folder without one counts as free)."""
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.create = create
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (taking over the file of a dead holder)."""
        if self.held:
            return
        if not self.create:
            if self.path.is_file():
                self._probe()
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._flock(fd)
            if self._same_file(fd):   # not a file its last holder unlinked meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up and remove ``run.lock``."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def _probe(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        self._flock(fd)
        os.close(fd)   # closing drops the probe's lock

    def _flock(self, fd: int) -> None:
        """Lock ``fd`` without waiting; RunDirError naming the holder's PID if it is taken."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"output folder {self.folder} is in use by process {holder} "
                              f"({LOCK_NAME}); wait for it to end or stop it") from None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False
