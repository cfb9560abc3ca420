"""Data-parallel speed-up: one cvgrad run on 2 ranks × 1 thread against the same run on
1 rank × 1 thread (bench/README.md, "Data-parallel training").

Each round starts the two runs one after the other (``python -m cvsparse train`` and
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m cvsparse train``, same
recipe, same global batch) and reads their ``report.json`` ``wall_time_s``: the time spent in
training epochs (steps, hyper passes, evaluation), without process start-up, data loading and
checkpoint writing.  The ratio of the medians over the rounds is the speed-up; the load average
before and after is printed with it, since the machine is shared.

Run as a script (``python bench/bench_distributed.py [--model lenet300] [--rounds 3]``) or
through ``python -m pytest bench/bench_distributed.py``, which asserts the issue's target of
1.6x for the default recipe (LeNet-5, global batch 256, on the MNIST test fixture).  On this
two-core machine the target needs both cores: it is not met while other jobs keep them busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TARGET = 1.6


def recipe(model: str) -> dict:
    """The benchmarked run: two epochs of ``model`` on the MNIST fixture (5,400 training
    images, 21 global batches of 256 per epoch), one outer iteration of cvgrad (one hyper step
    on a validation batch of 600), one intra-op thread per rank."""
    return {
        "model": model, "method": "cvgrad", "threads": 1,
        "data": {"dataset": "mnist", "batch_size": 256, "val_batch_size": 600},
        "optim": {"epochs": 2},
        "cvgrad": {"outer": 1, "hyper_batches": 1},
    }


def _train(command: list[str], config: Path, out: Path) -> float:
    """Run ``command ... train --config CONFIG --out OUT``; its ``wall_time_s`` (seconds)."""
    env = {**os.environ, "CVSPARSE_DATA": os.environ.get("CVSPARSE_DATA", str(FIXTURES))}
    done = subprocess.run([*command, "train", "--config", str(config), "--out", str(out),
                           "--overwrite", "--quiet"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return float(json.loads((out / "report.json").read_text())["wall_time_s"])


def measure(model: str = "lenet5", rounds: int = 3) -> dict[str, object]:
    """Median training time (s) of 1 and 2 ranks over ``rounds`` interleaved rounds, their
    ratio, and the 1-minute load average before and after."""
    one_rank = [sys.executable, "-m", "cvsparse"]
    two_ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", "-m", "cvsparse"]
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {"one": [], "two": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = folder / "recipe.yaml"
        config.write_text(yaml.safe_dump(recipe(model)))
        for _ in range(rounds):
            times["one"].append(_train(one_rank, config, folder / "one"))
            times["two"].append(_train(two_ranks, config, folder / "two"))
    one, two = statistics.median(times["one"]), statistics.median(times["two"])
    return {"model": model, "one_rank_s": one, "two_ranks_s": two, "speedup": one / two,
            "rounds": times, "load_before": load_before, "load_after": os.getloadavg()[0]}


def test_two_ranks_train_at_least_1_6x_faster():
    result = measure()
    print(json.dumps(result, indent=1))
    assert result["speedup"] >= TARGET, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.rounds), indent=1))


if __name__ == "__main__":
    main()
