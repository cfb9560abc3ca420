"""What an export changed: parameters, nonzeros, MACs, file size and latency, before and after.

    report = summary(model, shrink(model, x), x)
    print(format_summary(report))
"""

from __future__ import annotations

import io
import statistics
import time

import torch
from torch import Tensor, nn

from ..metrics import count_flops, eval_mode

__all__ = ["format_summary", "measure", "summary"]

#: The measured quantities, in table order, with their labels.
FIELDS: dict[str, str] = {
    "params": "parameters",
    "nonzero_params": "nonzero parameters",
    "macs": "MACs per sample",
    "macs_nonzero": "MACs per sample, nonzero weights",
    "file_bytes": "file size (state_dict, bytes)",
    "latency_ms": "latency (ms, median)",
}


def _file_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _latency_ms(model: nn.Module, example_input: Tensor, runs: int, warmup: int) -> float:
    """Median wall time of ``runs`` calls on ``example_input`` under ``torch.inference_mode``."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(example_input)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(model: nn.Module, example_input: Tensor, *, runs: int = 20, warmup: int = 3
            ) -> dict[str, float]:
    """The :data:`FIELDS` of one model (eval mode, restored afterwards) on ``example_input``
    ``(N, C, H, W)``: MACs (one multiply-add each, Conv/Linear layers, per sample, through
    :func:`cvsparse.metrics.count_flops`), serialized ``state_dict`` bytes and the median
    latency of a whole batch."""
    flops = count_flops(model, tuple(example_input.shape[1:]))
    with eval_mode(model):
        latency = _latency_ms(model, example_input, runs, warmup)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()),
        "macs": sum(f.flops_dense for f in flops) // 2,
        "macs_nonzero": sum(f.flops_effective for f in flops) // 2,
        "file_bytes": _file_bytes(model),
        "latency_ms": latency,
    }


def summary(model_before: nn.Module, model_after: nn.Module, example_input: Tensor, *,
            runs: int = 20) -> dict[str, dict[str, float]]:
    """Side by side: ``{"before": {...}, "after": {...}, "ratio": {...}}``, each keyed by
    :data:`FIELDS`; ``ratio`` is before / after (how many times smaller or faster; inf where
    ``after`` is 0).  The two models' latencies are sampled alternately (``runs`` rounds), so
    that a shared machine's load affects both alike."""
    before = measure(model_before, example_input, runs=1)
    after = measure(model_after, example_input, runs=1)
    t_before, t_after = [], []
    with eval_mode(model_before), eval_mode(model_after):
        for _ in range(runs):
            t_before.append(_latency_ms(model_before, example_input, 1, 0))
            t_after.append(_latency_ms(model_after, example_input, 1, 0))
    before["latency_ms"], after["latency_ms"] = statistics.median(t_before), statistics.median(
        t_after)
    ratio = {k: (before[k] / after[k] if after[k] else float("inf")) for k in FIELDS}
    return {"before": before, "after": after, "ratio": ratio}


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.3g}"


def format_summary(report: dict[str, dict[str, float]]) -> str:
    """:func:`summary`'s result as an aligned text table (one row per field)."""
    rows = [("", "before", "after", "before/after")]
    for key, label in FIELDS.items():
        rows.append((label, _fmt(report["before"][key]), _fmt(report["after"][key]),
                     f"{report['ratio'][key]:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    return "\n".join(lines)
