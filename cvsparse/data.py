"""Datasets held in memory as uint8 tensors, and their train/validation splits.

Loading (:func:`load_dataset`) searches these roots in order (:func:`search_roots`):

1. the explicit ``root`` argument;
2. ``$CVSPARSE_DATA``;
3. ``../shared/data`` relative to the current working directory;
4. ``../shared/data`` relative to the repository (the parent of the ``cvsparse`` package);
5. ``~/.cache/torchvision`` (:data:`DEFAULT_DOWNLOAD_ROOT`, also where ``download=True`` puts
   the files when neither ``root`` nor ``$CVSPARSE_DATA`` is given).

In each root it accepts, first match wins:

- ``<name>.npz`` with keys ``x_train, y_train, x_test, y_test`` (images NHWC, NCHW or, for
  MNIST, N×H×W uint8; labels integer);
- torchvision's layouts, read without importing torchvision: ``cifar-10-batches-py/``
  (``data_batch_1..5``, ``test_batch``), ``cifar-100-python/`` (``train``, ``test``; fine labels)
  and ``MNIST/raw/`` (or the root itself) with the four idx files, gzipped or not.

The CIFAR pickles are read with an unpickler that only admits the numpy array constructors, so
a tampered file cannot run code.  Decoded datasets are cached per process (keyed by the file or
directory they came from); treat their tensors as read-only.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cvsparse import imagefolder
from cvsparse.images import Dataset, channel_stats

DATASETS = ("mnist", "cifar10", "cifar100")
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}
IMAGE_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
#: ``../shared/data`` next to the repository holding this package.
REPO_DATA_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_DOWNLOAD_ROOT = Path("~/.cache/torchvision")
#: When training batches are augmented (``data.augment_phase``): every epoch, or only those
#: of the fine-tuning phase (the trainer switches the loaders, cvsparse.train.loop).
AUGMENT_PHASES = ("all", "finetune")

_CIFAR_DIRS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


_CACHE: dict[tuple[str, str], Dataset] = {}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def search_roots(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories :func:`load_dataset` searches, in order, without duplicates (see the
    module docstring).  Paths are absolute; they need not exist."""
    candidates = []
    if root is not None:
        candidates.append(Path(root))
    if os.environ.get("CVSPARSE_DATA"):
        candidates.append(Path(os.environ["CVSPARSE_DATA"]))
    candidates += [
        Path.cwd() / ".." / "shared" / "data",
        REPO_DATA_ROOT,
        DEFAULT_DOWNLOAD_ROOT,
    ]
    roots: list[Path] = []
    for path in candidates:
        path = Path(os.path.abspath(path.expanduser()))
        if path not in roots:
            roots.append(path)
    return roots


def _download_root(root: str | os.PathLike[str] | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("CVSPARSE_DATA"):
        return Path(os.environ["CVSPARSE_DATA"]).expanduser()
    return DEFAULT_DOWNLOAD_ROOT.expanduser()


# --------------------------------------------------------------------------- locating

def _existing(path: Path) -> Path | None:
    """``path`` or ``path.gz``, whichever exists (plain first)."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _layout_candidates(name: str, root: Path) -> list[tuple[Path, str]]:
    """``(path, format)`` pairs that could hold ``name`` under ``root``, in preference order."""
    out = [(root / f"{name}.npz", "npz")]
    if name in _CIFAR_DIRS:
        out.append((root / _CIFAR_DIRS[name][0], "cifar"))
    else:
        out += [(root / "MNIST" / "raw", "idx"), (root, "idx")]
    return out


def _present(name: str, path: Path, fmt: str) -> bool:
    if fmt == "npz":
        return path.is_file()
    if fmt == "cifar":
        _, train, test = _CIFAR_DIRS[name]
        return all((path / f).is_file() for f in train + test)
    return all(_existing(path / f) is not None for f in _MNIST_FILES)


def _describe(name: str, path: Path, fmt: str) -> str:
    if fmt == "npz":
        return str(path)
    if fmt == "cifar":
        _, train, test = _CIFAR_DIRS[name]
        return f"{path}/{{{','.join(train + test)}}}"
    return f"{path}/{{{','.join(_MNIST_FILES)}}}[.gz]"


def _locate(name: str, roots: Sequence[Path]) -> tuple[Path, str] | None:
    for root in roots:
        for path, fmt in _layout_candidates(name, root):
            if _present(name, path, fmt):
                return path, fmt
    return None


# --------------------------------------------------------------------------- readers

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _read_npz(path: Path) -> Arrays:
    with np.load(path, allow_pickle=False) as archive:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        return archive["x_train"], archive["y_train"], archive["x_test"], archive["y_test"]


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler admitting only the globals that pickled numpy arrays need."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return getattr(importlib.import_module(module), name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR batch (expected a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: CIFAR batch without 'data' or {label_key!r}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[label_key])


def _read_cifar(name: str, directory: Path) -> Arrays:
    _, train_files, test_files = _CIFAR_DIRS[name]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    parts = []
    for files in (train_files, test_files):
        batches = [_read_cifar_batch(directory / f, label_key) for f in files]
        parts.append(np.concatenate([b[0] for b in batches]))
        parts.append(np.concatenate([b[1] for b in batches]))
    return parts[0], parts[1], parts[2], parts[3]


def _read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte idx array (the MNIST file format)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + math.prod(dims):
        raise ValueError(f"{path}: {len(raw) - header} data bytes, header says {dims}")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


def _read_mnist(directory: Path) -> Arrays:
    arrays = []
    for stem in _MNIST_FILES:
        path = _existing(directory / stem)
        assert path is not None  # _present checked it
        arrays.append(_read_idx(path))
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _images_nchw(x: np.ndarray, name: str, where: Path) -> Tensor:
    """uint8 ``(N, C, H, W)`` from N×H×W, NHWC or NCHW, checked against the dataset's shape."""
    c, h, w = IMAGE_SHAPES[name]
    if x.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {x.dtype}")
    if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
    if x.ndim == 4 and x.shape[1:] == (h, w, c):
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    if x.ndim == 4 and x.shape[1:] == (c, h, w):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{where}: images of shape {x.shape} do not fit {name} ({c}x{h}x{w})")


def _labels(y: np.ndarray, n: int, num_classes: int, where: Path) -> Tensor:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be {n} integers, got {y.dtype} {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{where}: labels outside [0, {num_classes})")
    return torch.from_numpy(y.astype(np.int64))


def _decode(name: str, path: Path, fmt: str) -> Dataset:
    if fmt == "npz":
        arrays = _read_npz(path)
    elif fmt == "cifar":
        arrays = _read_cifar(name, path)
    else:
        arrays = _read_mnist(path)
    x_train, y_train, x_test, y_test = arrays
    num_classes = NUM_CLASSES[name]
    x_train_t = _images_nchw(x_train, name, path)
    x_test_t = _images_nchw(x_test, name, path)
    if len(x_train_t) == 0:
        raise ValueError(f"{path}: no training images")
    mean, std = channel_stats(x_train_t)
    return Dataset(
        name=name,
        x_train=x_train_t,
        y_train=_labels(y_train, len(x_train_t), num_classes, path),
        x_test=x_test_t,
        y_test=_labels(y_test, len(x_test_t), num_classes, path),
        mean=mean,
        std=std,
        num_classes=num_classes,
        source=path,
    )


class DownloadError(FileNotFoundError):
    """A dataset was found nowhere and could not be downloaded (one-line message)."""


def _download(name: str, root: Path) -> None:
    """Fetch both splits of ``name`` into ``root`` with torchvision (which shows a progress
    bar); raises whatever torchvision raises, ImportError without torchvision."""
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError as exc:
        raise ImportError("torchvision is not installed (pip install 'cvsparse[vision]')") from exc
    cls = {"mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}[name]
    for train in (True, False):
        getattr(datasets, cls)(root=str(root), train=train, download=True)


def source_files(dataset: Dataset) -> list[Path]:
    """The files the built-in set ``dataset`` was decoded from: its ``.npz``, or the files of
    the MNIST idx / CIFAR pickle folder it came from."""
    source = Path(dataset.source)
    if source.is_file():
        return [source]
    if dataset.name in _CIFAR_DIRS:
        _, train, test = _CIFAR_DIRS[dataset.name]
        return [source / name for name in train + test]
    found = [_existing(source / stem) for stem in _MNIST_FILES]
    return [path for path in found if path is not None]


def load_dataset(
    name: str, root: str | os.PathLike[str] | None = None, download: bool = False, *,
    image_size: int | None = None,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) into memory from the first root of
    :func:`search_roots` that holds it in an accepted layout (see the module docstring).

    ``imagefolder:<path>`` reads that folder instead (:mod:`cvsparse.imagefolder`; ``root``
    and ``download`` do not apply), its images ``image_size`` pixels square (None: 224).

    With ``download=True`` and the set found nowhere, torchvision downloads it into ``root``
    (else ``$CVSPARSE_DATA``, else :data:`DEFAULT_DOWNLOAD_ROOT`) and it is read from there.
    Raises FileNotFoundError listing every path tried if the set is missing and ``download`` is
    off, :class:`DownloadError` (a FileNotFoundError with a one-line message) if the download
    fails, ValueError if a found file is malformed.
    """
    if name.startswith("imagefolder:"):
        return imagefolder.load(name, imagefolder.folder_path(name),
                                image_size or imagefolder.DEFAULT_IMAGE_SIZE)
    _check_name(name)
    roots = search_roots(root)
    found = _locate(name, roots)
    if found is None and download:
        target = Path(os.path.abspath(_download_root(root)))
        try:
            _download(name, target)
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
            raise DownloadError(
                f"dataset {name!r} is in none of {', '.join(map(str, roots))}, and downloading "
                f"it into {target} failed ({reason}); put {name}.npz or torchvision's layout "
                f"into one of those folders, or name one with --data-root / $CVSPARSE_DATA "
                f"(docs/data.md)"
            ) from exc
        found = _locate(name, [target])
    if found is None:
        tried = "\n".join(
            f"  {_describe(name, path, fmt)}"
            for r in roots
            for path, fmt in _layout_candidates(name, r)
        )
        raise FileNotFoundError(
            f"dataset {name!r} not found; looked for:\n{tried}\n"
            f"Get it with load_dataset({name!r}, download=True) (CLI: --download; needs "
            f"torchvision and internet), or put {name}.npz (keys x_train, y_train, x_test, "
            f"y_test) or torchvision's layout into one of the directories above "
            f"(e.g. the one named by $CVSPARSE_DATA)."
        )
    path, fmt = found
    key = (name, str(path))
    if key not in _CACHE:
        _CACHE[key] = _decode(name, path, fmt)
    return _CACHE[key]


# --------------------------------------------------------------------------- splits

def _check_int(value: object, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arg} must be an int, got {value!r}")
    return value


def split_indices(n_train: int, n_val: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split ``range(n_train)`` into disjoint sorted int64 index tensors ``(train, val)`` with
    ``len(val) == n_val``, a deterministic function of ``(n_train, n_val, seed)``."""
    _check_int(n_train, "n_train")
    _check_int(n_val, "n_val")
    _check_int(seed, "seed")
    if n_val < 0 or n_val >= n_train:
        raise ValueError(f"n_val must be in [0, n_train={n_train}), got {n_val}")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def default_val_size(name: str, n_train: int | None = None) -> int:
    """Validation split size: 5000 images for CIFAR, 6000 for MNIST (10% of the full training
    sets); for a smaller training set of ``n_train`` images (e.g. the test fixtures), 10% of
    it.  An image folder (``imagefolder:<path>``) is treated as CIFAR."""
    if not name.startswith("imagefolder:"):
        _check_name(name)
    size = 6000 if name == "mnist" else 5000
    return size if n_train is None else min(size, n_train // 10)
