"""Models and datasets named by a string, beyond the built-in ones (docs/cli.md, docs/data.md).

A model name (``RunConfig.model``, ``--model``) is one of

- a zoo name, a key of :data:`cvsparse.models.MODELS` (``resnet20`` ...);
- ``torchvision:<name>``, any torchvision classification model, built untrained by
  ``torchvision.models.get_model(name, weights=None, num_classes=n)``;
- ``package.module:factory``, a callable of an importable module returning an ``nn.Module``,
  called with ``num_classes=n`` when its signature takes that argument (else with none).

A dataset name (``data.dataset``, ``--dataset``) is a key of :data:`cvsparse.data.DATASETS` or
``imagefolder:<path>`` (:mod:`cvsparse.imagefolder`).  The ``check_*`` functions raise a one-line
ValueError for a name that cannot work, before any data is read.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cvsparse.imagefolder import DEFAULT_IMAGE_SIZE, check_folder, folder_path, is_image_folder

if TYPE_CHECKING:
    from cvsparse.config import RunConfig

TORCHVISION = "torchvision:"
#: Named in the error for an unknown torchvision model without a close match.
_COMMON_TORCHVISION = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0",
                       "convnext_tiny", "vit_b_16")


def _torchvision_models() -> list[str]:
    """torchvision's classification model names; ValueError if torchvision is missing."""
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError:
        raise ValueError("torchvision: models need torchvision (pip install "
                         "'cvsparse[vision]')") from None
    return models.list_models(module=models)


def _factory(name: str) -> Callable[..., Any]:
    """The callable ``module:attr`` names (``attr`` may be dotted); ValueError naming what is
    missing."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {name!r} is not package.module:factory")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:   # ImportError, or whatever the module raises on import
        raise ValueError(f"model {name!r}: module {module_name!r} cannot be imported "
                         f"({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model {name!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model {name!r}: {attr!r} is not callable (it is a "
                         f"{type(target).__name__})")
    return target


def check_model(name: str) -> None:
    """ValueError (one line) unless ``name`` is a zoo model, a torchvision classification model
    (``torchvision:<name>``) or an importable callable (``package.module:factory``)."""
    from cvsparse.models import MODELS

    if name.startswith(TORCHVISION):
        tv_name, known = name[len(TORCHVISION):], _torchvision_models()
        if tv_name not in known:
            shown = difflib.get_close_matches(tv_name, known, n=6) or [
                m for m in _COMMON_TORCHVISION if m in known]
            raise ValueError(f"unknown torchvision model {tv_name!r}; e.g. "
                             f"{', '.join(shown)} ({len(known)} classification models in all: "
                             "torchvision.models.list_models())")
    elif ":" in name:
        _factory(name)
    elif name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}, "
                         "torchvision:NAME or package.module:factory")


def check_dataset(name: str) -> None:
    """ValueError (one line) unless ``name`` is a built-in dataset or an image folder with
    ``train/`` and ``val/`` class folders (:func:`cvsparse.imagefolder.check_folder`)."""
    from cvsparse.data import DATASETS

    if is_image_folder(name):
        check_folder(folder_path(name))
    elif name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or "
                         "imagefolder:PATH")


def _takes_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):   # no signature to read (some builtins)
        return False
    return any(p.kind == p.VAR_KEYWORD or (p.name == "num_classes" and p.kind != p.POSITIONAL_ONLY)
               for p in params)


def build(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialized model ``name`` (see the module docstring) with ``num_classes``
    outputs; ``in_channels`` reaches zoo models only (torchvision models read 3 channels, a
    factory decides itself).  ValueError (one line) if the name or the factory fails."""
    from cvsparse.models import build_model

    check_model(name)
    if name.startswith(TORCHVISION):
        models = importlib.import_module("torchvision.models")
        return models.get_model(name[len(TORCHVISION):], weights=None, num_classes=num_classes)
    if ":" not in name:
        return build_model(name, num_classes=num_classes, in_channels=in_channels)
    factory = _factory(name)
    kwargs = {"num_classes": num_classes} if _takes_num_classes(factory) else {}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ValueError(f"model {name!r}: the factory raised {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: the factory returned a {type(model).__name__}, "
                         "not an nn.Module")
    return model


def check_fits(model: nn.Module, name: str, input_shape: tuple[int, int, int],
               num_classes: int, dataset: str) -> None:
    """ValueError (one line) unless ``model`` reads ``input_shape`` ``(C, H, W)`` images and
    returns ``(N, num_classes)`` logits in training mode.  Zoo models are not run (their
    shapes are known); others get one forward pass on two zero images, on the CPU, with the
    random state and the buffers (BatchNorm statistics) restored afterwards."""
    from cvsparse.models import MODELS

    if name in MODELS:
        return
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != input_shape[0]:
        raise ValueError(f"model {name!r} reads {first.in_channels}-channel images; dataset "
                         f"{dataset!r} has {input_shape[0]}-channel ones")
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = model.train()(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise ValueError(f"model {name!r} does not take dataset {dataset!r}'s "
                         f"{'x'.join(map(str, input_shape))} images: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved, strict=True):
                buffer.copy_(value)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {name!r} returns {got} for 2 images in training mode; "
                         f"expected logits of shape (2, {num_classes}) (num_classes)")


def resolve_num_classes(requested: int | None, dataset_classes: int, dataset: str) -> int:
    """The model's output count: ``requested`` (``num_classes``), else the dataset's;
    ValueError if fewer than the dataset's labels need."""
    if requested is None:
        return dataset_classes
    if requested < dataset_classes:
        raise ValueError(f"num_classes {requested} is fewer than the {dataset_classes} classes "
                         f"of dataset {dataset!r}")
    return requested


def image_shape(config: RunConfig) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a run of ``config`` trains on, without reading
    them: 3×S×S for an image folder (S = ``data.image_size``), else the built-in set's shape."""
    from cvsparse.models import DATASET_IMAGE_SHAPES

    if is_image_folder(config.data.dataset):
        size = config.data.image_size or DEFAULT_IMAGE_SIZE
        return (3, size, size)
    return DATASET_IMAGE_SHAPES[config.data.dataset]


def num_classes(config: RunConfig) -> int:
    """The output count of a run of ``config``: ``num_classes`` as the run resolved it, else
    (runs that predate the key) the built-in dataset's class count."""
    from cvsparse.data import NUM_CLASSES

    if config.num_classes is not None:
        return config.num_classes
    if config.data.dataset not in NUM_CLASSES:
        raise ValueError(f"the run's configuration records no num_classes for dataset "
                         f"{config.data.dataset!r}")
    return NUM_CLASSES[config.data.dataset]
