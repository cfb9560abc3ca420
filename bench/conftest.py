"""Shared pieces of the benchmark suite (run with ``pytest bench``).

* Collects ``bench_*.py`` files (the project's pytest config only collects ``test_*.py``).
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


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


class Paired:
    """Baselines run once each (timed) before every round of the benchmarked operation.

    Use ``benchmark.pedantic(op, setup=paired.setup, rounds=...)``; afterwards
    :meth:`median` gives each baseline's median seconds over the same rounds.
    """

    def __init__(self, baselines: dict[str, Callable[[], object]]):
        self.baselines = baselines
        self.times: dict[str, list[float]] = {name: [] for name in baselines}

    def setup(self) -> None:
        for name, fn in self.baselines.items():
            start = time.perf_counter()
            fn()
            self.times[name].append(time.perf_counter() - start)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


@pytest.fixture
def paired() -> type[Paired]:
    """The :class:`Paired` class (fixtures are how a conftest shares code with its modules)."""
    return Paired
