"""Tests of the Triton kernels (``cvsparse.kernels``); without a GPU they run in Triton's
interpreter, which ``tests/conftest.py`` selects before triton is imported."""
