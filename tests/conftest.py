"""Test setup shared by the whole run.

Without a GPU the Triton kernels can only run in Triton's interpreter, on CPU tensors, and the
interpreter is chosen when triton is first imported (``cvsparse.ops`` imports it indirectly).
This file is loaded before any test module, so it selects the interpreter here.

Data: every test reads the small real subsets in ``tests/fixtures`` (``mnist.npz``,
``cifar10.npz``, made by ``tests/fixtures/make_fixtures.py``), through ``$CVSPARSE_DATA``, the
first root :func:`cvsparse.data.load_dataset` searches after an explicit one; subprocesses
inherit it.  Tests that need the complete sets are marked ``full_data``: deselected by default
(``pyproject.toml``), run by ``python -m pytest tests -m full_data`` with the full sets in the
usual search order (e.g. ``../shared/data``).  No test downloads anything: see
:func:`_no_downloads`.  Tests for hardware this machine lacks are deselected, never skipped:
see :func:`pytest_collection_modifyitems`.
"""

import os
from pathlib import Path

import pytest
import torch

from cvsparse import data

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
os.environ["CVSPARSE_DATA"] = str(FIXTURES)

_REAL_DOWNLOAD = data._download


def pytest_collection_modifyitems(config, items):
    """Deselect (not skip) what this machine cannot run: ``cuda`` tests without a GPU,
    ``cpu_only`` tests with one."""
    unrunnable = "cpu_only" if torch.cuda.is_available() else "cuda"
    dropped = [item for item in items if item.get_closest_marker(unrunnable)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker(unrunnable)]


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """A test that would download a dataset fails instead (as on a machine without network):
    ``data._download`` raises.  Tests of the download path restore it with :func:`real_download`
    and replace torchvision's dataset class."""

    def refuse(name, root):
        raise OSError(f"tests do not download ({name} into {root})")

    monkeypatch.setattr(data, "_download", refuse)


@pytest.fixture
def real_download(monkeypatch):
    """Undo :func:`_no_downloads` for this test: ``data._download`` is the real one again."""
    monkeypatch.setattr(data, "_download", _REAL_DOWNLOAD)


@pytest.fixture
def full_data(monkeypatch):
    """For ``full_data`` tests: ``$CVSPARSE_DATA`` unset, so the usual search order finds the
    complete sets (``../shared/data`` next to the repository or the working directory)."""
    monkeypatch.delenv("CVSPARSE_DATA", raising=False)
