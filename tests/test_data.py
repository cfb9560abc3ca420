"""Datasets (real MNIST / CIFAR-10 statistics, torchvision layouts, lookup) and splits."""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
import struct
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from cvsparse import data
from cvsparse.batches import BatchLoader
from cvsparse.data import load_dataset, split_indices

# --------------------------------------------------------------------------- real data

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHIPPED_DOWNLOAD_ROOT = data.DEFAULT_DOWNLOAD_ROOT
PUBLISHED_MEAN = {"mnist": (0.1307,), "cifar10": (0.4914, 0.4822, 0.4465)}


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def cifar10():
    return load_dataset("cifar10")


def _full_root(name: str) -> Path:
    """The first search root (``$CVSPARSE_DATA`` unset by the ``full_data`` fixture) holding
    the complete dataset ``name`` in any layout."""
    for root in data.search_roots():
        if data._locate(name, [root]) is not None:
            return root
    raise FileNotFoundError(f"the full {name} is in none of {data.search_roots()}")


def test_tests_read_the_fixtures(mnist, cifar10):
    assert mnist.source == FIXTURES / "mnist.npz"
    assert cifar10.source == FIXTURES / "cifar10.npz"


@pytest.mark.parametrize(("name", "train", "test"), [("mnist", 600, 100), ("cifar10", 80, 20)])
def test_fixtures_are_class_stratified_real_images(name, train, test):
    """The fixtures hold ``train``/``test`` images of every class, and their pixel means lie
    within five standard errors of the published means of the full sets (the standard error
    estimated from the spread of the fixture's per-image means; uniform noise would be at
    0.5, dozens of standard errors away)."""
    ds = load_dataset(name)
    c, h, w = data.IMAGE_SHAPES[name]
    assert ds.x_train.shape == (10 * train, c, h, w) and ds.x_test.shape == (10 * test, c, h, w)
    assert torch.bincount(ds.y_train).tolist() == [train] * 10
    assert torch.bincount(ds.y_test).tolist() == [test] * 10
    per_image = ds.x_train.double().div(255).mean(dim=(2, 3))          # (N, C)
    stderr = per_image.std(dim=0) / math.sqrt(len(per_image))
    gap = (torch.tensor(ds.mean, dtype=torch.float64) -
           torch.tensor(PUBLISHED_MEAN[name], dtype=torch.float64)).abs()
    assert bool((gap < 5 * stderr).all()), (gap, stderr)


@pytest.mark.full_data
def test_mnist_matches_published_facts(full_data):
    mnist = load_dataset("mnist")
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_train.dtype == torch.uint8
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.dtype == torch.int64 and mnist.y_test.shape == (10000,)
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    # the published statistics are rounded to 4 decimals: within half a unit of the last one
    assert mnist.mean[0] == pytest.approx(0.1307, abs=5e-5)
    assert mnist.std[0] == pytest.approx(0.3081, abs=5e-5)
    assert mnist.num_classes == 10 and mnist.name == "mnist"
    assert mnist.source.exists()


@pytest.mark.full_data
def test_cifar10_matches_published_facts(full_data):
    cifar10 = load_dataset("cifar10")
    assert cifar10.x_train.shape == (50000, 3, 32, 32) and cifar10.x_train.is_contiguous()
    assert cifar10.x_test.shape == (10000, 3, 32, 32)
    # channel order and NHWC -> NCHW conversion: the published RGB means differ per channel
    # (rounded to 4 decimals: within half a unit of the last one)
    assert cifar10.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=5e-5)
    assert cifar10.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=5e-5)
    assert torch.bincount(cifar10.y_train).tolist() == [5000] * 10
    assert torch.bincount(cifar10.y_test).tolist() == [1000] * 10
    assert cifar10.image_shape == (3, 32, 32)


@pytest.mark.full_data
def test_fixtures_are_what_make_fixtures_makes_from_the_full_sets(full_data, tmp_path):
    """``tests/fixtures/make_fixtures.py`` rebuilds the shipped fixtures byte for byte from the
    full sets, and every fixture image is the full set's image at the index it was taken from."""
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    for name in ("mnist", "cifar10"):
        assert make_fixtures.main([str(_full_root(name)), "--out", str(tmp_path)]) == 0
        assert (tmp_path / f"{name}.npz").read_bytes() == (FIXTURES / f"{name}.npz").read_bytes()
        full, small = load_dataset(name), load_dataset(name, root=FIXTURES)
        idx = make_fixtures.stratified(full.y_train.numpy(), make_fixtures.PER_CLASS[name][0],
                                       make_fixtures.SEED)
        assert torch.equal(small.x_train, full.x_train[torch.from_numpy(idx)])
        assert torch.equal(small.y_train, full.y_train[torch.from_numpy(idx)])


def test_loaded_once_per_process(cifar10):
    assert load_dataset("cifar10") is cifar10


def test_normalized_cifar_has_zero_mean_unit_std(cifar10):
    """The loader's ``(x/255 − mean)/std`` with the dataset's own statistics.  Each float32
    value carries a relative rounding error of at most 2⁻²³·few (|x| < 3), and the sums are
    taken in float64, so mean and mean square are exact to ~1e-6."""
    n_images = len(cifar10.y_train)
    loader = BatchLoader(cifar10.x_train, cifar10.y_train, torch.arange(n_images), 128,
                         shuffle=False, augment=False, mean=cifar10.mean, std=cifar10.std)
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for x, _ in loader:
        s += x.double().sum(dim=(0, 2, 3))
        s2 += x.double().square().sum(dim=(0, 2, 3))
    n = n_images * 32 * 32
    assert torch.allclose(s / n, torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.allclose(s2 / n, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_channel_stats_match_direct_computation():
    images = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8)
    mean, std = data.channel_stats(images)
    scaled = images.double() / 255
    assert mean == pytest.approx(scaled.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(scaled.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-12)


# --------------------------------------------------------------------------- file layouts


def cifar_row(image_chw: np.ndarray) -> np.ndarray:
    """One row of a CIFAR batch as the format describes it: 1024 red values, then 1024 green,
    then 1024 blue, each channel row-major."""
    return np.concatenate([image_chw[0].ravel(), image_chw[1].ravel(), image_chw[2].ravel()])


def write_cifar_batch(path: Path, images: np.ndarray, **labels: np.ndarray) -> None:
    """A batch file as the CIFAR pickles hold it (bytes keys, labels as Python lists)."""
    batch = {
        b"batch_label": b"synthetic batch",
        b"data": np.stack([cifar_row(im) for im in images]),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    for key, values in labels.items():
        batch[key.encode()] = [int(v) for v in values]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: two zero bytes, type 0x08 (unsigned byte), number of dimensions, then each
    dimension as a big-endian uint32, then the data in row-major order."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def random_split(rng, n, shape, classes):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n)


def write_mnist_raw(directory: Path, rng, n_train=6, n_test=4, gz=(True, False, True, False)):
    xs = random_split(rng, n_train, (28, 28), 10) + random_split(rng, n_test, (28, 28), 10)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for name, array, zipped in zip(names, xs, gz, strict=True):
        write_idx(directory / (name + (".gz" if zipped else "")), array)
    return xs


def assert_loaded(ds, x_train, y_train, x_test, y_test, nchw=lambda x: x):
    assert torch.equal(ds.x_train, torch.from_numpy(nchw(x_train)))
    assert torch.equal(ds.y_train, torch.from_numpy(y_train.astype(np.int64)))
    assert torch.equal(ds.x_test, torch.from_numpy(nchw(x_test)))
    assert torch.equal(ds.y_test, torch.from_numpy(y_test.astype(np.int64)))


def test_torchvision_cifar10_layout(tmp_path):
    rng = np.random.default_rng(0)
    train = [random_split(rng, 3, (3, 32, 32), 10) for _ in range(5)]
    test = random_split(rng, 4, (3, 32, 32), 10)
    folder = tmp_path / "cifar-10-batches-py"
    for i, (x, y) in enumerate(train, start=1):
        write_cifar_batch(folder / f"data_batch_{i}", x, labels=y)
    write_cifar_batch(folder / "test_batch", test[0], labels=test[1])
    ds = load_dataset("cifar10", root=tmp_path)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    assert_loaded(ds, x_train, y_train, *test)
    assert ds.source == folder and ds.num_classes == 10
    assert ds.mean == pytest.approx(data.channel_stats(torch.from_numpy(x_train))[0])


def test_torchvision_cifar100_layout_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    train, test = random_split(rng, 5, (3, 32, 32), 100), random_split(rng, 3, (3, 32, 32), 100)
    folder = tmp_path / "cifar-100-python"
    for part, (x, y) in (("train", train), ("test", test)):
        write_cifar_batch(folder / part, x, fine_labels=y, coarse_labels=y // 5)
    ds = load_dataset("cifar100", root=tmp_path)
    assert_loaded(ds, *train, *test)
    assert ds.num_classes == 100


@pytest.mark.parametrize("subdir", ["MNIST/raw", "."])
def test_torchvision_mnist_layout_gz_and_plain(tmp_path, subdir):
    xs = write_mnist_raw(tmp_path / subdir, np.random.default_rng(2))
    ds = load_dataset("mnist", root=tmp_path)
    assert_loaded(ds, *xs, nchw=lambda x: x[:, None])


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(3)
    x_tr, y_tr = random_split(rng, 4, (3, 32, 32), 10)
    x_te, y_te = random_split(rng, 2, (3, 32, 32), 10)
    for layout, to_file in (("nhwc", lambda x: x.transpose(0, 2, 3, 1)), ("nchw", lambda x: x)):
        root = tmp_path / layout
        root.mkdir()
        np.savez(root / "cifar10.npz", x_train=to_file(x_tr), y_train=y_tr,
                 x_test=to_file(x_te), y_test=y_te)
        assert_loaded(load_dataset("cifar10", root=root), x_tr, y_tr, x_te, y_te)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"x_train": np.zeros((4, 30, 30), np.uint8)}, "do not fit"),
        ({"x_train": np.zeros((4, 28, 28), np.float32)}, "uint8"),
        ({"y_train": np.array([0, 1, 2, 10])}, "outside"),
        ({"y_test": np.array([0, 1, 2])}, "labels must be"),
    ],
)
def test_malformed_npz_is_rejected_naming_the_file(tmp_path, change, match):
    arrays = {"x_train": np.zeros((4, 28, 28), np.uint8), "y_train": np.arange(4),
              "x_test": np.zeros((2, 28, 28), np.uint8), "y_test": np.arange(2)}
    arrays.update(change)
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("mnist", root=tmp_path)
    assert str(tmp_path / "mnist.npz") in str(info.value)


def test_bad_idx_header_is_rejected(tmp_path):
    write_mnist_raw(tmp_path, np.random.default_rng(4), gz=(False,) * 4)
    raw = bytearray((tmp_path / "train-images-idx3-ubyte").read_bytes())
    raw[2] = 0x0D  # float data type
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="idx"):
        load_dataset("mnist", root=tmp_path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_pickle_with_foreign_code_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-100-python"
    x, y = random_split(rng, 2, (3, 32, 32), 100)
    write_cifar_batch(folder / "test", x, fine_labels=y)
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": _Payload(), b"fine_labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="print"):
        load_dataset("cifar100", root=tmp_path)
    assert "never run" not in capsys.readouterr().out


# --------------------------------------------------------------------------- lookup


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Every search root points into tmp_path (explicit, env, cwd-relative, repo, cache)."""
    monkeypatch.setenv("CVSPARSE_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(data, "REPO_DATA_ROOT", tmp_path / "repo" / "shared" / "data")
    monkeypatch.setattr(data, "DEFAULT_DOWNLOAD_ROOT", tmp_path / "cache")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def test_search_roots_order(isolated):
    t = isolated
    expected = [t / "explicit", t / "env", t / "shared" / "data", t / "repo" / "shared" / "data",
                t / "cache"]
    assert data.search_roots(t / "explicit") == expected
    assert data.search_roots() == expected[1:]
    assert data.search_roots(t / "env") == expected[1:]  # duplicates dropped


def test_missing_dataset_error_lists_every_place(isolated):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=isolated / "explicit")
    message = str(info.value)
    for root in data.search_roots(isolated / "explicit"):
        assert str(root / "cifar10.npz") in message
        assert str(root / "cifar-10-batches-py") in message
    assert "download=True" in message and "--download" in message


def test_roots_are_searched_in_order(isolated, monkeypatch):
    rng = np.random.default_rng(6)
    as_nchw = {"nchw": lambda x: x[:, None]}
    env = write_mnist_raw(isolated / "env" / "MNIST" / "raw", rng)
    cwd_relative = write_mnist_raw(isolated / "shared" / "data", rng)
    explicit = write_mnist_raw(isolated / "explicit", rng)
    assert_loaded(load_dataset("mnist"), *env, **as_nchw)
    assert_loaded(load_dataset("mnist", root=isolated / "explicit"), *explicit, **as_nchw)
    assert load_dataset("mnist", root=isolated / "nowhere").source == isolated / "env/MNIST/raw"
    monkeypatch.delenv("CVSPARSE_DATA")
    assert_loaded(load_dataset("mnist"), *cwd_relative, **as_nchw)


def test_download_goes_to_env_root_and_is_read_back(isolated, monkeypatch):
    calls = []

    def fake_download(name, root):  # what torchvision.datasets.MNIST(download=True) leaves
        calls.append((name, root))
        fake_download.arrays = write_mnist_raw(root / "MNIST" / "raw", np.random.default_rng(7))

    monkeypatch.setattr(data, "_download", fake_download)
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist")
    assert calls == []
    ds = load_dataset("mnist", download=True)
    assert calls == [("mnist", isolated / "env")]
    assert_loaded(ds, *fake_download.arrays, nchw=lambda x: x[:, None])
    load_dataset("mnist", download=True)  # found now: no second download
    assert len(calls) == 1


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="cifar100"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="mnist"):
        data.default_val_size("imagenet")


# --------------------------------------------------------------------------- splits


def test_split_indices_deterministic_disjoint_complete():
    train, val = split_indices(1000, 100, seed=0)
    again_train, again_val = split_indices(1000, 100, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert train.dtype == val.dtype == torch.int64
    assert len(val) == 100 and len(train) == 900
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))
    assert not torch.equal(split_indices(1000, 100, seed=1)[1], val)
    # not just the first or last block
    assert 0 < val.float().mean().item() / 1000 < 1 and val.max() - val.min() > 500


def test_split_indices_edge_cases():
    train, val = split_indices(10, 0, seed=0)
    assert len(val) == 0 and torch.equal(train, torch.arange(10))
    for n_val in (10, 11, -1):
        with pytest.raises(ValueError, match="n_val"):
            split_indices(10, n_val, seed=0)
    with pytest.raises(ValueError, match="seed"):
        split_indices(10, 2, seed=0.5)


def test_default_val_size():
    assert data.default_val_size("cifar10") == data.default_val_size("cifar100") == 5000
    assert data.default_val_size("mnist") == 6000


# --------------------------------------------------------------------------- download


def _fake_torchvision(monkeypatch, make):
    """A stand-in ``torchvision.datasets`` whose ``MNIST`` is ``make`` (a class); returns the
    list of ``(root, train, download)`` it was called with."""
    calls = []

    class MNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            make(Path(root), train)

    module = types.ModuleType("torchvision.datasets")
    module.MNIST = MNIST
    monkeypatch.setitem(sys.modules, "torchvision.datasets", module)
    return calls


def test_cli_downloads_a_missing_set_into_the_default_root(isolated, monkeypatch,
                                                          real_download):
    """``cvsparse train`` without ``--download``, the set in none of the search roots: it
    calls torchvision's ``MNIST(root=<default root>, train=..., download=True)`` for both
    splits, then trains on what that left (torchvision's ``MNIST/raw`` idx files, here a
    slice of the real fixture)."""
    from cvsparse.cli import main

    monkeypatch.delenv("CVSPARSE_DATA")
    monkeypatch.setattr(data, "DEFAULT_DOWNLOAD_ROOT", SHIPPED_DOWNLOAD_ROOT)  # undo `isolated`
    for var in ("HOME", "USERPROFILE"):   # ~ is a fresh home in tmp_path
        monkeypatch.setenv(var, str(isolated / "home"))
    small = load_dataset("mnist", root=FIXTURES)
    subset = {True: (small.x_train[:1000, 0], small.y_train[:1000]),
              False: (small.x_test[:200, 0], small.y_test[:200])}

    def write_raw(root, train):  # the files torchvision's MNIST leaves after downloading
        x, y = subset[train]
        prefix = "train" if train else "t10k"
        write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", x.numpy())
        write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", y.numpy())

    calls = _fake_torchvision(monkeypatch, write_raw)
    cache = isolated / "home" / ".cache" / "torchvision"   # the documented default root
    out = isolated / "run"
    assert main(["train", "--model", "lenet300", "--dataset", "mnist", "--epochs", "1",
                 "--outer", "1", "--max-steps-per-epoch", "2", "--threads", "1", "--quiet",
                 "--out", str(out)]) == 0
    assert calls == [(str(cache), True, True), (str(cache), False, True)]
    assert load_dataset("mnist").source == cache / "MNIST" / "raw"
    assert (out / "report.json").is_file()


@pytest.mark.parametrize("failure", ["network", "no torchvision"])
def test_found_nowhere_and_download_impossible_is_a_one_line_error(
        isolated, monkeypatch, capsys, real_download, failure):
    from cvsparse.cli import main

    if failure == "network":
        def unreachable(root, train):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

        calls = _fake_torchvision(monkeypatch, unreachable)
    else:
        monkeypatch.setitem(sys.modules, "torchvision.datasets", None)  # import fails
    code = main(["train", "--dataset", "mnist", "--out", str(isolated / "o"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: dataset 'mnist' is in none of ")
    assert str(isolated / "env") in err and str(isolated / "cache") in err
    if failure == "network":
        assert calls == [(str(isolated / "env"), True, True)]
        assert "failed (URLError: <urlopen error [Errno -3] Temporary failure" in err
    else:
        assert "torchvision is not installed" in err
    assert not (isolated / "o").exists()


def test_no_download_lists_every_place_instead(isolated, monkeypatch, capsys, real_download):
    from cvsparse.cli import main

    calls = _fake_torchvision(monkeypatch, lambda root, train: None)
    code = main(["train", "--dataset", "mnist", "--no-download", "--out",
                 str(isolated / "o"), "--quiet"])
    assert code == 2 and calls == []
    err = capsys.readouterr().err
    for root in data.search_roots():
        assert str(root / "mnist.npz") in err
