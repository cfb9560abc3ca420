"""Checkpoints that cannot lie, and the random-number state a bitwise resume needs.

A checkpoint file is ``torch.save`` of ``{"format", "version", "sha256", "state"}``: ``state``
holds only tensors, numbers, strings, None and (nested) dicts, lists and tuples, so the file
loads with ``torch.load(weights_only=True)`` and reading it never runs code; ``sha256`` is the
SHA-256 of a canonical walk of ``state`` (every key, every scalar, every tensor's dtype, shape
and bytes) and is verified on load.  :class:`CheckpointStore` keeps the previous checkpoint
beside the current one (``checkpoint.prev.pt``) and falls back to it when the current one fails
its check.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
FORMAT = "cvsparse-checkpoint"
VERSION = 2
#: Test hook: seconds to sleep inside every checkpoint write, after the current checkpoint has
#: become the previous one and before the new one is in place (lets a test kill a process there).
STALL_ENV = "CVSPARSE_TEST_CHECKPOINT_STALL"


class CheckpointError(ValueError):
    """A checkpoint (or weights file) is missing, unreadable, incomplete or fails its checksum."""


# ---- content digest ---------------------------------------------------------------------------

def digest(state: Any) -> str:
    """SHA-256 (hex) of a canonical walk of ``state``; TypeError on a value that a
    ``weights_only`` load could not restore (anything but tensors, numbers, strings, None,
    mappings, lists and tuples)."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)};".encode())
        for item in value:
            _feed(h, item)
    elif value is None or type(value) in (bool, int, float, str):   # not numpy scalars
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"checkpoint state holds a {type(value).__name__}; only tensors, "
                        "numbers, strings, None, dicts, lists and tuples are allowed")


# ---- one file ----------------------------------------------------------------------------------

def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with its digest to ``path`` atomically: a temporary file beside it is
    written and fsynced, then renamed over ``path`` and the folder fsynced, so a crash leaves
    either the old file or the new one, never a mix."""
    path = Path(path)
    envelope = {"format": FORMAT, "version": VERSION, "sha256": digest(state), "state": state}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(envelope, f)
            f.flush()
            os.fsync(f.fileno())
        _stall_for_tests()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load(path: str | Path) -> dict[str, Any]:
    """The state stored in ``path`` by :func:`save_atomic`, on the CPU, after checking its
    checksum; CheckpointError (one line) if the file is missing, unreadable (truncated, not a
    checkpoint, a pickle that would run code) or fails the check."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    envelope = read_weights_only(path)
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cvsparse checkpoint")
    state = envelope.get("state")
    try:
        actual = digest(state)
    except TypeError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if actual != envelope.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its content does not match its SHA-256")
    return state


def read_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; any failure (a truncated or
    damaged file, a pickle that asks for code) becomes a one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # every failure of an untrusted file is a refusal, not a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            first = "it holds objects other than tensors and plain data (refused, not run)"
        raise CheckpointError(f"cannot read {path}: {first[:200]}") from None


def _stall_for_tests() -> None:
    seconds = os.environ.get(STALL_ENV)
    if seconds:
        time.sleep(float(seconds))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:   # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- the current and the previous checkpoint --------------------------------------------------

class CheckpointStore:
    """``checkpoint.pt`` and ``checkpoint.prev.pt`` of a run folder.

    :meth:`save` renames the current checkpoint to the previous one, then writes the new one
    (fsynced, renamed into place).  :meth:`load` returns the current checkpoint's state or, if
    that one fails its check, the previous one's with a warning.  ``required`` names the keys
    a state must have to count as complete.
    """

    def __init__(self, folder: str | Path, required: tuple[str, ...] = ()) -> None:
        self.folder = Path(folder)
        self.required = required
        self.current = self.folder / CHECKPOINT_NAME
        self.previous = self.folder / PREVIOUS_NAME
        self._current_valid = True   # False after a fallback: never rotate a bad file in

    def save(self, state: dict[str, Any]) -> None:
        """Keep the current checkpoint as the previous one, then write ``state`` atomically."""
        if self.current.exists() and self._current_valid:
            os.replace(self.current, self.previous)
        save_atomic(state, self.current)
        self._current_valid = True

    def load(self) -> dict[str, Any]:
        """The newest valid state; CheckpointError naming both failures if none is valid."""
        if not self.current.exists() and not self.previous.exists():
            raise CheckpointError(f"no checkpoint in {self.folder}; nothing to resume")
        try:
            return self._checked(self.current)
        except CheckpointError as first:
            self._current_valid = False
            try:
                state = self._checked(self.previous)
            except CheckpointError as second:
                raise CheckpointError(f"{first}; and {second}") from None
            warnings.warn(f"{first}; resuming from {self.previous.name} (after epoch "
                          f"{state.get('epoch')})", stacklevel=2)
            return state

    def _checked(self, path: Path) -> dict[str, Any]:
        state = load(path)
        missing = [k for k in self.required if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
        return state


# ---- random-number state ------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """The global generators of Python, NumPy and torch (CPU and CUDA), as tensors and plain
    values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
