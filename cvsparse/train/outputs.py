"""What a run writes for people: ``metrics.csv``, ``report.json``, a summary table, plots."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_metrics_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` (one per epoch for ``metrics.csv``, one per point for ``curve.csv``) as CSV,
    atomically, nothing when there are none; columns are the union of the rows' keys in
    first-seen order."""
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def summary_table(report: dict[str, Any]) -> str:
    """A one-screen text summary: totals, then the per-tensor table."""
    lines = [
        f"model {report['config']['model']} on {report['config']['data']['dataset']}, "
        f"method {report['config']['method']}, {report['wall_time_s']:.0f} s",
        f"test acc {_percent(report['test_acc'])}   val acc {_percent(report['val_acc'])}",
        f"weights {report['params_nonzero']:,} / {report['params_total']:,} nonzero   "
        f"compression {report['compression_rate']:.1f}x   pruned {report['pruned_pct']:.2f}%",
        f"FLOPs {report['flops_effective']:,} / {report['flops_dense']:,} "
        f"({_ratio(report['flops_dense'], report['flops_effective'])} fewer)",
        *_budget_line(report),
        *_floor_line(report),
        *_accuracy_line(report),
        "",
        f"{'tensor':<28}{'shape':>20}{'nonzero':>12}{'pruned %':>10}{'units off':>12}",
    ]
    for row in report["layers"]:
        shape = "x".join(str(s) for s in row["shape"])
        units = f"{row.get('units_zero', 0)}/{row.get('units_total', 0)}"
        lines.append(f"{row['name']:<28}{shape:>20}{row['nonzero']:>12,}"
                     f"{row['pruned_pct']:>10.2f}{units:>12}")
    return "\n".join(lines)


def _percent(fraction: float | None) -> str:
    """``0.9804`` as ``98.04%``; ``-`` for None (a run without a test set)."""
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


def _budget_line(report: dict[str, Any]) -> list[str]:
    """``["budget ...: met at epoch E" | "... not met"]`` for a method that ends its pruning
    phase at a compression or FLOPs budget and reports ``budget_met_at_epoch``; else ``[]``."""
    if "budget_met_at_epoch" not in report:
        return []
    section = report["config"].get(report["config"]["method"], {})
    targets = []
    if section.get("target_compression") is not None:
        targets.append(f"compression >= {section['target_compression']:g}x")
    if section.get("target_flops") is not None:
        targets.append(f"FLOPs <= {section['target_flops']:g} of dense")
    if not targets:
        return []
    epoch = report["budget_met_at_epoch"]
    status = "NOT met" if epoch is None else f"met after epoch {epoch}"
    return [f"budget {' or '.join(targets)}: {status}"]


def _floor_line(report: dict[str, Any]) -> list[str]:
    """``["floor compression >= Cx: met" | "... NOT met"]`` for a cvgrad run with a
    ``min_compression`` floor, judged on the final network; else ``[]``."""
    floor = report["config"].get("cvgrad", {}).get("min_compression")
    if report["config"]["method"] != "cvgrad" or floor is None:
        return []
    status = "met" if report["compression_rate"] >= floor else "NOT met"
    return [f"floor compression >= {floor:g}x: {status}"]


def _accuracy_line(report: dict[str, Any]) -> list[str]:
    """For an accuracy-constrained run: the reference, the bound and whether the final
    network's validation accuracy meets it; else ``[]``."""
    if report.get("accuracy_bound") is None:
        return []
    status = "met" if report["constraint_met_val"] else "NOT met"
    return [f"accuracy val {_percent(report['val_acc'])} >= bound "
            f"{_percent(report['accuracy_bound'])} (reference "
            f"{_percent(report['reference_val_acc'])}, {report['reference_source']}): {status}"]


def comparison_table(reports: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one row per run: model, method, test error, compression, FLOPs, the
    validation accuracy (against its bound for an accuracy-constrained run) and wall time."""
    lines = [
        "| run | model | method | epochs | test error (%) | compression | pruned (%) "
        "| FLOPs kept (%) | validation (%) | wall time (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, r in reports.items():
        flops = 100 * r["flops_effective"] / r["flops_dense"] if r["flops_dense"] else 100.0
        error = "-" if r["test_acc"] is None else f"{100 * (1 - r['test_acc']):.2f}"
        wall = r.get("wall_time_s")
        lines.append(
            f"| {name} | {r['config']['model']} | {r['config']['method']} | {r['epochs']} "
            f"| {error} | {r['compression_rate']:.1f}x "
            f"| {r['pruned_pct']:.2f} | {flops:.1f} | {_validation_cell(r)} "
            f"| {'-' if wall is None else f'{wall:.0f}'} |"
        )
    return "\n".join(lines)


def _validation_cell(report: dict[str, Any]) -> str:
    """The final validation accuracy in points; for a constrained run, against its bound."""
    val = report.get("val_acc")
    if val is None:
        return "-"
    if report.get("accuracy_bound") is None:
        return f"{100 * val:.2f}"
    sign = ">=" if report.get("constraint_met_val") else "<"
    return f"{100 * val:.2f} {sign} {100 * report['accuracy_bound']:.2f}"


def _ratio(dense: float, effective: float) -> str:
    return f"{dense / effective:.1f}x" if effective else "all"


def write_plots(rows: list[dict[str, Any]], report: dict[str, Any], plot_dir: Path,
                points: list[dict[str, Any]] | None = None) -> list[Path]:
    """accuracy.png (with the validation ``points`` measured inside the epochs, the rows of
    ``curve.csv``), sparsity.png, lambda.png (cvgrad), layers.png and, for an
    accuracy-constrained run, drive.png (every check's validation accuracy and bound against
    its compression); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] + 1 for r in rows]   # epochs trained
    written = []

    def save(fig, name: str) -> None:
        path = plot_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test")):
        shown = [r for r in rows if key in r]   # e.g. no test accuracy without a test set
        if shown:
            ax.plot([r["epoch"] + 1 for r in shown], [100 * r[key] for r in shown], marker="o",
                    ms=3, label=label)
    if points:
        ax.plot([p["epoch"] + p["step"] / p["steps"] for p in points],
                [100 * p["val_acc"] for p in points], ls="none", marker=".", ms=4, color="C1",
                label="validation, inside the epochs")
    bounded = [r for r in rows if r.get("accuracy_bound") is not None]
    if bounded:   # a constrained run: the validation bound after each epoch
        ax.plot([r["epoch"] + 1 for r in bounded], [100 * r["accuracy_bound"] for r in bounded],
                ls=":", color="C3", label="bound (validation)")
    ax.set(xlabel="epochs trained", ylabel="accuracy (%)", title="Accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["pruned_pct"] for r in rows], marker="o", ms=3, color="C3")
    ax.set(xlabel="epochs trained", ylabel="pruned weights (%)", title="Sparsity", ylim=(0, 100))
    ax2 = ax.twinx()
    ax2.plot(epochs, [r["compression_rate"] for r in rows], ls="--", color="C0",
             label="compression")
    if rows and "floor" in rows[0]:   # cvgrad's compression floor, where one is set
        ax2.plot(epochs, [r["floor"] for r in rows], ls=":", color="C7", label="floor")
        ax2.legend(loc="lower right")
    ax2.set_ylabel("compression rate (x)", color="C0")
    ax.grid(alpha=0.3)
    save(fig, "sparsity.png")

    history = report.get("lambda_history") or []
    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        outer = [h["outer"] for h in history]
        for key, style in (("lambda1", "-"), ("lambda2", "--")):
            values = np.array([h[key] for h in history])
            for j in range(values.shape[1]):
                label = key if values.shape[1] == 1 else (key if j == 0 else None)
                ax.plot(outer, values[:, j], style, marker="o", ms=3, label=label,
                        color="C0" if key == "lambda1" else "C1", alpha=0.8)
        ax.set(xlabel="outer iteration", ylabel="λ", yscale="log", title="Learned λ")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        save(fig, "lambda.png")

    checks = report.get("constraint_history") or []
    if checks:
        fig, ax = plt.subplots(figsize=(6, 4))
        rates = [h["compression"] for h in checks]
        ax.plot(rates, [100 * h["val_acc"] for h in checks], marker="o", ms=3,
                label="check (probe)")
        ax.plot(rates, [100 * h["bound"] for h in checks], ls="--", color="C3", label="bound")
        kept = [h for h in checks if h["at"] == report.get("selected_at")]
        if kept:
            ax.scatter([kept[0]["compression"]], [100 * kept[0]["val_acc"]], s=90, zorder=3,
                       facecolors="none", edgecolors="k", label="kept")
        ax.set(xscale="log", xlabel="compression at the check (x)",
               ylabel="validation accuracy (%)", title="Accuracy-constrained drive")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        save(fig, "drive.png")

    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers)), 4))
    ax.bar(range(len(layers)), [r["pruned_pct"] for r in layers], color="C2")
    ax.set_xticks(range(len(layers)), [r["name"] for r in layers], rotation=70, fontsize=7)
    ax.set(ylabel="pruned (%)", title="Per-tensor sparsity", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    save(fig, "layers.png")
    return written
