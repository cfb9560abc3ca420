"""``cvsparse export`` and ``cvsparse eval``: a finished run as a deployable file, and a
deployable file measured on a test set.

    cvsparse export runs/lenet300 --out lenet300.cvsp              # shrink, then sparsify
    cvsparse export runs/lenet300 --format onnx --out lenet300.onnx
    cvsparse eval lenet300.cvsp --dataset mnist --batch-size 64

The command functions return the exit status (0 done, 2 refused: one ``error:`` line on
stderr) and print their tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: ``--format`` choices of ``cvsparse export``; the default is the fastest, ``sparse``.
FORMATS = ("shrunk", "sparse", "onnx")
DATASETS = ("mnist", "cifar10", "cifar100")


class CommandError(ValueError):
    """A refused command: the message is the one line printed after ``error:``."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``export`` and ``eval`` subcommands, on the ``cvsparse`` parser's subparsers."""
    export = sub.add_parser("export", help="write a finished run's model as a deployable file "
                            "(shrunk, sparse or ONNX) and print what changed")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--format", choices=FORMATS, default="sparse",
                        help="shrunk: dead channels removed (portable file); sparse (default): "
                        "shrunk, then sparse layers where they measure faster (portable file); "
                        "onnx: shrunk, as standard ONNX")
    export.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="the file to write")
    export.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="batch the export is timed and tuned at (default 1)")
    evaluate = sub.add_parser("eval", help="test accuracy, size and latency of an exported "
                              "file beside the dense original")
    evaluate.add_argument("file", type=Path, metavar="FILE",
                          help="a portable file (cvsparse export, cvsparse.export.save) or an "
                          ".onnx file")
    evaluate.add_argument("--dataset", choices=DATASETS, required=True)
    evaluate.add_argument("--batch-size", type=int, default=64, metavar="N",
                          help="evaluation batch and the second latency batch (default 64)")
    evaluate.add_argument("--data-root", help="folder with <dataset>.npz or torchvision "
                          "layouts (default: the usual search, docs/data.md)")
    evaluate.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                          help="download a dataset found nowhere (default: on)")


def run(args: argparse.Namespace) -> int:
    """Run ``export`` or ``eval``; one ``error:`` line and exit status 2 for bad input."""
    from .onnx_export import OnnxExportError
    from .portable import PortableFileError, UnsupportedModelError

    try:
        if args.batch_size < 1:
            raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.command == "export":
            print(export_run(args.run_dir, args.format, args.out, args.batch_size))
        else:
            print(evaluate_file(args.file, args.dataset, args.batch_size, args.data_root,
                                args.download))
    except (CommandError, PortableFileError, UnsupportedModelError, OnnxExportError,
            FileNotFoundError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:   # a damaged checkpoint, a malformed data file, ...
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---- export -------------------------------------------------------------------------------------

def _run_model(run_dir: Path) -> tuple[nn.Module, Any]:
    """The model a run folder's checkpoint holds, as plain layers in eval mode, and the run's
    configuration."""
    from cvsparse import sources
    from cvsparse.config import from_dict
    from cvsparse.train.checkpoint import CHECKPOINT_NAME, CheckpointError
    from cvsparse.train.checkpoint import load as load_checkpoint

    if not run_dir.is_dir():
        raise CommandError(f"{run_dir} is not a run folder")
    try:
        state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CommandError(f"{run_dir / CHECKPOINT_NAME} holds no model and configuration")
    config = from_dict(state["config"])
    model = sources.build(config.model, sources.num_classes(config),
                          sources.image_shape(config)[0])
    if config.method == "autoprune":
        from cvsparse.methods.autoprune_optimizer import gated_names
        from cvsparse.nn import convert, strip

        ap = config.autoprune
        convert(model, granularity=ap.granularity, ste=ap.ste,
                layers=gated_names(model, ap.skip_layers), slope=ap.slope, update=ap.update)
        model.load_state_dict(state["model"])
        strip(model)
    else:
        model.load_state_dict(state["model"])
    return model.eval(), config


def _normalization(config: Any) -> dict[str, Any] | None:
    """The input normalization the run trained with (its dataset's training statistics), if
    the dataset can be read without downloading it."""
    from cvsparse.data import load_dataset

    try:
        ds = load_dataset(config.data.dataset, config.data.root, download=False,
                          image_size=config.data.image_size)
    except (FileNotFoundError, ValueError) as exc:
        warnings.warn(f"the input normalization is not recorded in the file ({_one_line(exc)})",
                      stacklevel=2)
        return None
    return {"mean": list(ds.mean), "std": list(ds.std), "scale": 255}


def export_run(run_dir: Path, fmt: str, out: Path, batch_size: int = 1) -> str:
    """Write the model of the run in ``run_dir`` to ``out`` as ``fmt`` (one of
    :data:`FORMATS`); returns the summary table (before and after, and the file written)."""
    from cvsparse.sources import image_shape

    from .onnx_export import to_onnx
    from .portable import save
    from .shrink import shrink
    from .summary import format_summary, summary

    if fmt not in FORMATS:
        raise CommandError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder; name the file to write")
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: the folder {out.parent} does not exist")
    model, config = _run_model(run_dir)
    dataset = config.data.dataset
    example = torch.randn(batch_size, *image_shape(config),
                          generator=torch.Generator().manual_seed(0))
    metadata = {"model": config.model, "dataset": dataset, "method": config.method,
                "normalization": _normalization(config)}
    after = shrink(model, example)
    notes = []
    if fmt == "sparse":
        try:
            from .sparsify import sparsify
        except ImportError:
            raise CommandError("--format sparse needs cvsparse.export.sparsify, which this "
                               "installation lacks; use --format shrunk") from None
        notes.append(str(sparsify(after, example_input=example)))
    if fmt == "onnx":
        size = to_onnx(after, example, out, metadata=metadata)
    else:
        size = save(after, out, example_input=example, metadata=metadata)
    table = format_summary(summary(model, after, example))
    lines = [f"{run_dir}: {config.model} on {dataset} ({config.method}), batch {batch_size}",
             table, *notes,
             f"wrote {out} ({fmt}, {size:,} bytes)"]
    return "\n".join(lines)


# ---- eval ---------------------------------------------------------------------------------------

def _load_file(path: Path) -> tuple[Callable[[Tensor], Tensor], dict[str, Any], dict[str, int],
                                     str]:
    """A callable model of the file, its cvsparse metadata, its parameter counts and its kind
    (``portable`` or ``onnx``)."""
    if not path.is_file():
        raise CommandError(f"no file at {path}")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    from .portable import load, read_spec

    model = load(path)
    metadata = read_spec(path)["spec"].get("metadata") or {}
    return _inference(model), metadata, _count(model), "portable"


def _inference(model: nn.Module) -> Callable[[Tensor], Tensor]:
    def call(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)
    return call


def _count(model: nn.Module) -> dict[str, int]:
    """Stored weights: every parameter, plus the packed values and biases of sparse layers
    (which hold them as buffers)."""
    tensors = list(model.parameters())
    for m in model.modules():
        if type(m).__name__ in ("SparseLinear", "SparseConv2d"):
            tensors += [t for t in (m.values, m.bias) if t is not None]
    return {"params": sum(t.numel() for t in tensors),
            "nonzero_params": sum(int(t.count_nonzero()) for t in tensors)}


def _load_onnx(path: Path) -> tuple[Callable[[Tensor], Tensor], dict[str, Any], dict[str, int],
                                     str]:
    try:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper
    except ImportError as exc:
        raise CommandError(f"evaluating an ONNX file needs onnx and onnxruntime "
                           f"(pip install 'cvsparse[export]'): {exc}") from None
    try:
        proto = onnx.load(str(path))
        runner = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:   # a damaged or foreign file
        raise CommandError(f"{path} is not a readable ONNX model: {_one_line(exc)}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        metadata = json.loads(props.get("cvsparse", "{}"))
    except json.JSONDecodeError:
        metadata = {}
    arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    floats = [a for a in arrays if a.dtype.kind == "f"]
    counts = {"params": int(sum(a.size for a in floats)),
              "nonzero_params": int(sum((a != 0).sum() for a in floats))}
    name = runner.get_inputs()[0].name

    def call(x: Tensor) -> Tensor:
        return torch.from_numpy(runner.run(None, {name: x.numpy()})[0])

    return call, metadata, counts, "onnx"


def _latencies_ms(fns: list[Callable[[Tensor], Any]], x: Tensor, runs: int = 20
                  ) -> list[float]:
    """Median wall time of one call of each function on ``x`` (after 3 warm-up calls each),
    the functions called in turn in every round so that a shared machine's load affects them
    alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(runs + 3):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn(x)
            if i >= 3:
                samples.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def evaluate_file(path: Path, dataset: str, batch_size: int = 64, data_root: str | None = None,
                  download: bool = True) -> str:
    """Test accuracy, parameters, file size and latency (batch 1 and ``batch_size``) of the
    exported file ``path`` on ``dataset``, beside the dense original architecture when the file
    names its zoo model; returns the table."""
    from cvsparse.batches import BatchLoader
    from cvsparse.data import load_dataset
    from cvsparse.models import MODELS, build_model

    if dataset not in DATASETS:
        raise CommandError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    fn, metadata, counts, kind = _load_file(path)
    ds = load_dataset(dataset, data_root, download)
    norm = metadata.get("normalization") if isinstance(metadata, dict) else None
    if isinstance(norm, dict) and len(norm.get("mean", ())) == ds.image_shape[0]:
        mean, std, source = norm["mean"], norm["std"], "recorded in the file"
    else:
        mean, std, source = ds.mean, ds.std, f"{dataset} training statistics"
    test = BatchLoader(ds.x_test, ds.y_test, torch.arange(len(ds.y_test)), batch_size,
                       shuffle=False, augment=False, mean=mean, std=std)
    correct = 0
    try:
        for x, y in test:
            correct += int((fn(x).argmax(1) == y).sum())
    except Exception as exc:   # the model does not take these images
        raise CommandError(f"{path} does not take {dataset} images of shape "
                           f"{tuple(ds.image_shape)}: {_one_line(exc)[:200]}") from None
    accuracy = correct / len(ds.y_test)
    first = next(iter(test))[0]
    x1 = first[:1]
    xn = first if len(first) == batch_size else x1.repeat(batch_size, 1, 1, 1)
    fns = [fn]
    origin = metadata.get("model") if isinstance(metadata, dict) else None
    if origin in MODELS:
        torch.manual_seed(0)
        dense = build_model(origin, num_classes=ds.num_classes,
                            in_channels=ds.image_shape[0]).eval()
        fns.append(_inference(dense))
    lat1, latn = _latencies_ms(fns, x1), _latencies_ms(fns, xn)
    columns = [(f"{path.name} ({kind})", {
        "accuracy": f"{100 * accuracy:.2f}%", "params": f"{counts['params']:,}",
        "nonzero": f"{counts['nonzero_params']:,}", "size": f"{path.stat().st_size:,}",
        "lat1": f"{lat1[0]:.3g}", "latn": f"{latn[0]:.3g}"})]
    if len(fns) == 2:
        n = sum(p.numel() for p in dense.parameters())
        columns.append((f"dense {origin}", {
            "accuracy": "—", "params": f"{n:,}", "nonzero": f"{n:,}", "size": f"{4 * n:,}",
            "lat1": f"{lat1[1]:.3g}", "latn": f"{latn[1]:.3g}"}))
    labels = {"accuracy": f"test accuracy ({len(ds.y_test):,} images)",
              "params": "parameters", "nonzero": "nonzero parameters",
              "size": "file size (bytes; dense: float32 weights)",
              "lat1": "latency, batch 1 (ms)", "latn": f"latency, batch {batch_size} (ms)"}
    rows = [("", *[c[0] for c in columns])]
    rows += [(label, *[c[1][key] for c in columns]) for key, label in labels.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                      for row in rows)
    return f"{path} on {dataset} (normalization: {source})\n{table}"
