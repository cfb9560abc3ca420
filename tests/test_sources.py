"""Bring-your-own model and data: ``--model torchvision:NAME``, ``--model module:factory`` and
``--dataset imagefolder:PATH`` through the command line, Trainer and export.

Oracles: models built by torchvision or the factory directly; an image folder written here from
the CIFAR-10 fixture, its expected tensors made by torchvision's ``Resize`` + ``CenterCrop``
from the same PIL images and its statistics by numpy in float64.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Resize
from torchvision.transforms.functional import pil_to_tensor

from cvsparse import cli, imagefolder, sources
from cvsparse.config import RunConfig
from cvsparse.data import load_dataset
from cvsparse.export import load
from cvsparse.train import Trainer, checkpoint

HERE = Path(__file__).resolve().parent
#: Folder name of CIFAR-10 labels 0, 1, 2: sorted, they give labels 2, 0, 1.
CLASS_NAMES = {0: "zebra", 1: "apple", 2: "mango"}
PER_CLASS = {"train": 8, "val": 3}


@pytest.fixture(autouse=True)
def _helpers_importable(monkeypatch):
    """``sources_helpers`` importable whatever pytest's import mode."""
    monkeypatch.syspath_prepend(str(HERE))


def _main(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _tiny_run_flags(out: Path) -> list[str]:
    return ["--epochs", "1", "--outer", "1", "--max-steps-per-epoch", "2", "--batch-size", "16",
            "--threads", "1", "--quiet", "--out", str(out)]


# ---- module:factory --------------------------------------------------------------------------

def test_factory_model_trains_and_exports_from_the_command_line(tmp_path, capsys, monkeypatch):
    import sources_helpers

    sources_helpers.CALLS.clear()
    out = tmp_path / "run"
    code, err = _main(capsys, "train", "--model", "sources_helpers:tiny_mlp", "--dataset",
                      "mnist", *_tiny_run_flags(out))
    assert code == 0, err
    assert sources_helpers.CALLS == [{"num_classes": 10}]    # the dataset's, not the default 7
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["model"] == "sources_helpers:tiny_mlp"
    assert report["config"]["num_classes"] == 10
    trained = sources_helpers.tiny_mlp(num_classes=10)
    trained.load_state_dict(checkpoint.load(out / checkpoint.CHECKPOINT_NAME)["model"])

    code, err = _main(capsys, "export", out, "--format", "shrunk", "--out", tmp_path / "m.cvsp")
    assert code == 0, err
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "m.cvsp")(x), trained.eval()(x))

    # Exporting needs the factory's module: without it, one line naming it.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p).resolve() != HERE])
    monkeypatch.delitem(sys.modules, "sources_helpers")
    code, err = _main(capsys, "export", out, "--out", tmp_path / "n.cvsp")
    assert code == 2
    assert "module 'sources_helpers' cannot be imported" in err
    assert not (tmp_path / "n.cvsp").exists()


def test_factory_without_num_classes_is_called_without_it():
    import sources_helpers

    sources_helpers.CALLS.clear()
    model = sources.build("sources_helpers:fixed_mlp", 10, 1)
    assert sources_helpers.CALLS == [{}]
    assert model[-1].out_features == 10


# ---- torchvision: ----------------------------------------------------------------------------

def test_torchvision_resnet18_trains_with_the_datasets_class_count(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _main(capsys, "train", "--model", "torchvision:resnet18", "--dataset",
                      "cifar10", *_tiny_run_flags(out))
    assert code == 0, err
    reference = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    state = checkpoint.load(out / checkpoint.CHECKPOINT_NAME)["model"]
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    assert json.loads((out / "report.json").read_text())["config"]["num_classes"] == 10


def test_num_classes_and_image_size_flags_set_their_keys():
    args = cli._parser().parse_args(["train", "--num-classes", "12", "--image-size", "64",
                                     "--out", "unused"])
    config = cli.config_from_args(args)
    assert (config.num_classes, config.data.image_size) == (12, 64)
    assert (RunConfig().num_classes, RunConfig().data.image_size) == (None, None)
    assert sources.build("torchvision:resnet18", 12, 3).fc.out_features == 12


# ---- imagefolder: ----------------------------------------------------------------------------

def _write_folder(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """An image folder of CIFAR-10 fixture images of labels 0–2; in each class one image is
    cropped to 32×24 (landscape) and one saved as grayscale.  Returns each split's
    ``(file, expected label)`` in ImageFolder's order."""
    cifar = load_dataset("cifar10")
    images = {"train": (cifar.x_train, cifar.y_train), "val": (cifar.x_test, cifar.y_test)}
    label_of = {name: i for i, name in enumerate(sorted(CLASS_NAMES.values()))}
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, (x, y) in images.items():
        files[split] = []
        for cifar_label, name in sorted(CLASS_NAMES.items(), key=lambda kv: kv[1]):
            folder = root / split / name
            folder.mkdir(parents=True)
            (folder / "notes.txt").write_text("not an image")
            chosen = torch.nonzero(y == cifar_label).flatten()[: PER_CLASS[split]]
            for j, index in enumerate(chosen.tolist()):
                image = Image.fromarray(x[index].permute(1, 2, 0).numpy())
                if j == 1:
                    image = image.crop((0, 4, 32, 28))
                if j == 2:
                    image = image.convert("L")
                path = folder / f"img_{j:02d}.png"
                image.save(path)
                files[split].append((path, label_of[name]))
    return files


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, list[tuple[Path, int]]]]:
    root = tmp_path_factory.mktemp("images") / "pets"
    return root, _write_folder(root)


def _expected(files: list[tuple[Path, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    transform = Compose([Resize(round(size * 8 / 7)), CenterCrop(size)])
    x = torch.stack([pil_to_tensor(transform(Image.open(p).convert("RGB"))) for p, _ in files])
    return x, torch.tensor([label for _, label in files])


@pytest.mark.parametrize("size", [32, 20])
def test_image_folder_loads_resized_center_cropped_images(folder, size):
    root, files = folder
    ds = load_dataset(f"imagefolder:{root}", image_size=size)
    x_train, y_train = _expected(files["train"], size)
    x_test, y_test = _expected(files["val"], size)
    assert torch.equal(ds.x_train, x_train) and torch.equal(ds.y_train, y_train)
    assert torch.equal(ds.x_test, x_test) and torch.equal(ds.y_test, y_test)
    assert ds.num_classes == 3 and ds.image_shape == (3, size, size)
    pixels = x_train.numpy().astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(ds.std, pixels.std(axis=(0, 2, 3)), rtol=1e-12)


def test_image_folder_digest_follows_the_files_not_the_location(folder, tmp_path):
    root, _ = folder
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    first = load_dataset(f"imagefolder:{root}", image_size=8).digest
    assert load_dataset(f"imagefolder:{copy}", image_size=8).digest == first
    (copy / "train" / "apple" / "img_05.png").rename(copy / "train" / "apple" / "img_99.png")
    assert load_dataset(f"imagefolder:{copy}", image_size=8).digest != first


def test_image_folder_run_trains_exports_and_resumes_only_on_the_same_data(
        folder, tmp_path, capsys):
    source, files = folder
    root = tmp_path / "pets"
    shutil.copytree(source, root)
    config = RunConfig(model="resnet20")
    config.data.dataset, config.data.image_size, config.data.batch_size = (
        f"imagefolder:{root}", 32, 8)
    config.optim.epochs, config.optim.max_steps_per_epoch, config.cvgrad.outer = 2, 2, 1
    config.threads = 1
    out = tmp_path / "run"
    trainer = Trainer(config, out, progress=False)
    assert len(trainer.val_idx) == len(files["train"]) // 10      # held out of train/
    assert len(trainer.test_loader.indices) == len(files["val"])
    loader = trainer.train_loader
    assert (loader.augment, loader.crop_padding, loader.flip) == (True, 4, True)
    assert trainer.model.fc.out_features == 3 == trainer.config.num_classes
    report = trainer.run(max_epochs=1)
    (record,) = report["provenance"]["data"]["files"]
    assert record["path"] == str(root.resolve())
    assert record["bytes"] == sum(p.stat().st_size for s in files.values() for p, _ in s)

    code, err = _main(capsys, "export", out, "--format", "shrunk", "--out", tmp_path / "m.cvsp")
    assert code == 0, err
    ds = load_dataset(f"imagefolder:{root}", image_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "m.cvsp")(x), trainer.model(x))
    from cvsparse.export.portable import read_spec

    meta = read_spec(tmp_path / "m.cvsp")["spec"]["metadata"]
    assert meta["normalization"]["mean"] == list(ds.mean)

    changed = root / "train" / "zebra" / "img_00.png"
    pixels = np.asarray(Image.open(changed)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(changed)
    code, err = _main(capsys, "train", "--resume", out, "--quiet")
    assert code == 2
    assert "not the data this run started with" in err


# ---- refused before any training -------------------------------------------------------------

def _bad_folder(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / "bad"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "a.png")
    if kind == "no val":
        shutil.rmtree(root / "val")
    elif kind == "no classes":
        shutil.rmtree(root / "train" / "cat")
    elif kind == "empty class":
        (root / "train" / "dog").mkdir()
        (root / "val" / "dog").mkdir()
        Image.new("RGB", (8, 8)).save(root / "val" / "dog" / "b.png")
    elif kind == "other classes":
        (root / "val" / "dog").mkdir()
    elif kind == "not an image":
        (root / "val" / "cat" / "b.png").write_bytes(b"no png")
    return root


@pytest.mark.parametrize("argv, message", [
    (["--model", "torchvision:resnet19"], "unknown torchvision model 'resnet19'; e.g. resnet18"),
    (["--model", "no_such_module_q:make"], "module 'no_such_module_q' cannot be imported"),
    (["--model", "sources_helpers:nope"], "'sources_helpers' has no attribute 'nope'"),
    (["--model", "sources_helpers:NOT_CALLABLE"], "'NOT_CALLABLE' is not callable"),
    (["--model", "sources_helpers:three_outputs"], "expected logits of shape (2, 10)"),
    (["--model", "torchvision:resnet18"], "reads 3-channel images; dataset 'mnist' has 1"),
    (["--image-size", "32"], "data.image_size applies to imagefolder datasets only"),
    (["--num-classes", "5"], "num_classes 5 is fewer than the 10 classes"),
    (["--num-classes", "0"], "num_classes must be an integer >= 1"),
])
def test_bad_model_or_flag_is_refused(tmp_path, capsys, argv, message):
    code, err = _main(capsys, "train", "--dataset", "mnist", *argv, *_tiny_run_flags(tmp_path))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / checkpoint.CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such folder"),
    ("no val", "no val/ folder"),
    ("no classes", "train/ holds no class folders"),
    ("empty class", "train/dog/ holds no images"),
    ("other classes", "different class folders (dog in only one of them)"),
    ("not an image", "b.png: not a readable image"),
])
def test_bad_image_folder_is_refused(tmp_path, capsys, kind, message):
    root = tmp_path / "absent" if kind == "missing" else _bad_folder(tmp_path, kind)
    code, err = _main(capsys, "train", "--model", "resnet20", "--dataset",
                      f"imagefolder:{root}", *_tiny_run_flags(tmp_path / "o"))
    assert code == 2
    assert str(root) in err and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / checkpoint.CHECKPOINT_NAME).exists()


def test_yaml_names_are_checked_like_flags(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: torchvision:not_a_net\ndata: {dataset: cifar10}\n")
    code, err = _main(capsys, "train", "--config", recipe, "--out", tmp_path / "o")
    assert code == 2 and "unknown torchvision model 'not_a_net'" in err


def test_image_folder_above_the_memory_limit_is_refused(folder, tmp_path, capsys, monkeypatch):
    root, files = folder
    monkeypatch.setattr(imagefolder, "MAX_DECODED_BYTES", 2**20)
    code, err = _main(capsys, "train", "--model", "resnet20", "--dataset",
                      f"imagefolder:{root}", *_tiny_run_flags(tmp_path / "o"))
    count = sum(len(s) for s in files.values())
    assert code == 2
    assert f"{count} images of 3x224x224" in err and "above the 1 MiB limit" in err
