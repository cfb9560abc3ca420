"""Where a run's numbers come from: the data files actually read (with their SHA-256), the
package, git commit, torch and Python versions, and the processor or GPU that computed them.

:func:`collect` gathers it once per run for ``report.json``; :func:`check_data_root` refuses a
``data.root`` (``--data-root``) that is not an existing folder instead of silently searching
elsewhere.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import cvsparse
from cvsparse import data as data_module
from cvsparse.imagefolder import check_folder, list_images

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def check_data_root(dataset: str, root: str | None) -> None:
    """FileNotFoundError (one line) if ``root`` is given and is not an existing folder."""
    if root is not None and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"dataset {dataset!r}: data root {root} (--data-root / "
                                "data.root) does not exist or is not a folder")


def check_same_data(recorded: list[str] | None, record: dict[str, Any]) -> None:
    """ValueError (one line) if the data files of ``record`` (:func:`collect`) do not have the
    SHA-256 digests ``recorded`` when a run started (None: nothing recorded, nothing to
    check): a resumed run must read the data it began with, wherever it now lives."""
    files = record["data"]["files"]
    if recorded is None or [f["sha256"] for f in files] == list(recorded):
        return
    where = ", ".join(f["path"] for f in files)
    raise ValueError(f"the data read now ({where}) is not the data this run started with "
                     "(SHA-256 differs); resume with the original data (--data-root)")


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of the file at ``path`` (cached per path, size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def file_records(dataset: data_module.Dataset) -> list[dict[str, Any]]:
    """``{path, sha256, bytes}`` of each file ``dataset`` was decoded from; an image folder is
    one record: the folder, the digest of its files taken while they were decoded
    (:func:`cvsparse.imagefolder.load`) and their total size."""
    if dataset.digest is not None:
        root = Path(dataset.source)
        size = sum(path.stat().st_size for items in list_images(root, check_folder(root)).values()
                   for path, _ in items)
        return [{"path": str(root.resolve()), "sha256": dataset.digest, "bytes": size}]
    return [{"path": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in data_module.source_files(dataset)]


def collect(dataset: data_module.Dataset, device: torch.device) -> dict[str, Any]:
    """The provenance record of a run on ``dataset`` computed on ``device``."""
    return {
        "data": {"dataset": dataset.name, "files": file_records(dataset)},
        "package_version": cvsparse.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": {"type": device.type, "name": device_name(device)},
    }


def git_commit() -> str | None:
    """The commit of the git checkout holding this package (``+dirty`` if tracked files are
    modified), or None when it is not in one or git is unavailable."""
    repo = Path(cvsparse.__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        head = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "-uno")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _git(repo: Path, *args: str) -> str:
    """``git ARGS`` in ``repo``, never taking git's index lock (others may be committing)."""
    command = ["git", "--no-optional-locks", "-C", str(repo), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
