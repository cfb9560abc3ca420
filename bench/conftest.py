"""Shared pieces of the benchmark suite (run with ``pytest bench``).

* ``scrub`` (fixture): rewrites a buffer larger than the last-level cache.  It runs before every
  timed call, so every operation starts from memory, as the weights do in a training step
  (activations have evicted them), and no operation inherits a cache warmed by another.
* :class:`Paired` (fixture ``paired``) times baseline operations *between* the rounds of a
  pytest-benchmark run, so an operator and its baselines are sampled interleaved, under the same
  load.  Ratios of their medians are what the suite asserts: on a machine shared with other
  jobs, timings of separate benchmarks drift too much to compare.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

SCRUB_BYTES = 512 * 2**20


@pytest.fixture(scope="session")
def scrub() -> Callable[[], None]:
    buffer = torch.zeros(SCRUB_BYTES // 4)

    def run() -> None:  # returns nothing: pytest-benchmark takes a setup's result as arguments
        buffer.add_(1.0)

    return run


class Paired:
    """Baselines run once each (timed, each after ``scrub``) before every round of the
    benchmarked operation, then ``scrub`` runs once more for the operation itself.

    Use ``benchmark.pedantic(op, setup=paired.setup, rounds=...)``; afterwards
    :meth:`median` gives each baseline's median seconds over the same rounds.
    """

    def __init__(self, baselines: dict[str, Callable[[], object]], scrub: Callable[[], None]):
        self.baselines = baselines
        self.scrub = scrub
        self.times: dict[str, list[float]] = {name: [] for name in baselines}

    def setup(self) -> None:
        for name, fn in self.baselines.items():
            self.scrub()
            start = time.perf_counter()
            fn()
            self.times[name].append(time.perf_counter() - start)
        self.scrub()

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


@pytest.fixture
def paired(scrub) -> Callable[[dict[str, Callable[[], object]]], Paired]:
    """Makes a :class:`Paired` for the given baselines (sharing the run's ``scrub``)."""
    return lambda baselines: Paired(baselines, scrub)
