"""The CUDA sources register exactly the operators of the schema, with matching C++ signatures.

The CUDA kernels can only run on a GPU and are only compiled with ``FORCE_CUDA=1``, so a CPU-only
machine never loads them; a drift between ``csrc/cuda/*.cu`` and ``cvsparse/ops/schemas.py``
would surface only on a GPU machine (as a registration error at import, or a missing kernel).
These tests read the sources instead: every ``TORCH_LIBRARY_IMPL`` block is a CUDA block of the
``cvsparse`` library, every schema has exactly one CUDA kernel, in ``csrc/cuda/<op>.cu``, and
each kernel function's C++ parameter and return types are the ones the dispatcher derives from
the schema.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from cvsparse.ops.schemas import SCHEMAS

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))

# Schema type -> the C++ type of the kernel argument / result (see torch/library.h).
CPP_ARG_TYPES = {
    "Tensor[]": "at::TensorList",
    "Tensor": "const at::Tensor&",
    "Tensor?": "const std::optional<at::Tensor>&",
    "int[2]": "at::IntArrayRef",
    "float": "double",
    "int": "int64_t",
    "bool": "bool",
}
CPP_RETURN_TYPES = {
    "Tensor": "at::Tensor",
    "(Tensor, Tensor)": "std::tuple<at::Tensor, at::Tensor>",
}

_IMPL_BLOCK = re.compile(r"TORCH_LIBRARY_IMPL\(\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*\)\s*\{")
_IMPL_CALL = r"\b{var}\.impl\(\s*\"(\w+)\"\s*,\s*&?([\w:]+)\s*\)"


def _source(path: Path) -> str:
    """The file's text without comments."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _impl_blocks(text: str) -> list[tuple[str, str, str, str]]:
    """(namespace, dispatch key, variable, body) of every TORCH_LIBRARY_IMPL block."""
    blocks = []
    for match in _IMPL_BLOCK.finditer(text):
        depth, end = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        blocks.append((*match.groups(), text[match.end(): end - 1]))
    return blocks


def _registrations() -> list[tuple[Path, str, str]]:
    """(file, operator, C++ function) of every ``m.impl`` in a CUDA source."""
    out = []
    for path in CU_FILES:
        for _, _, var, body in _impl_blocks(_source(path)):
            for op, function in re.findall(_IMPL_CALL.format(var=re.escape(var)), body):
                out.append((path, op, function.rsplit("::", 1)[-1]))
    return out


def _schema_types(schema: str) -> tuple[list[str], str]:
    """Argument types (alias annotations dropped) and return type of a schema string."""
    match = re.fullmatch(r"\w+\((.*)\) -> (.+)", schema)
    assert match, schema
    args, ret = match.groups()
    types = [re.sub(r"\(\w!?\)", "", arg.strip().rsplit(" ", 1)[0]) for arg in args.split(",")]
    return types, ret.strip()


def _normalize(cpp: str) -> str:
    return re.sub(r"\s*([&*<>,])\s*", r"\1", " ".join(cpp.split())).replace(",", ", ")


def _cpp_signature(text: str, function: str) -> tuple[list[str], str]:
    """Parameter declarations and return type of the definition of ``function`` in ``text``."""
    match = re.search(rf"^([^\n;{{}}()]+?)\s+{function}\s*\(([^)]*)\)\s*\{{", text, flags=re.M)
    assert match, f"no definition of {function}"
    ret, params = match.groups()
    return [_normalize(p) for p in params.split(",")], _normalize(ret)


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_each_source_registers_cuda_kernels_of_cvsparse_only(path):
    text = _source(path)
    blocks = _impl_blocks(text)
    assert blocks, f"{path.name} registers no kernel"
    assert {(ns, key) for ns, key, _, _ in blocks} == {("cvsparse", "CUDA")}
    assert not re.search(r"TORCH_LIBRARY\s*\(", text), "schemas are defined in csrc/ops.cpp only"


def test_every_schema_has_exactly_one_cuda_kernel():
    counts = Counter(op for _, op, _ in _registrations())
    assert counts == Counter(list(SCHEMAS))


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_each_kernel_lives_in_its_operators_file(op):
    # One file per operator; a backward lives with its forward.
    stem = op.rstrip("_").removesuffix("_backward")
    files = {path.name for path, name, _ in _registrations() if name == op}
    assert files == {f"{stem}.cu"}


@pytest.mark.parametrize("path,op,function", _registrations(),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_kernel_signature_matches_schema(path, op, function):
    arg_types, ret_type = _schema_types(SCHEMAS[op])
    params, ret = _cpp_signature(_source(path), function)
    assert ret == CPP_RETURN_TYPES[ret_type]
    assert len(params) == len(arg_types), f"{function} takes {params}, schema {arg_types}"
    for param, schema_type in zip(params, arg_types, strict=True):
        expected = CPP_ARG_TYPES[schema_type]
        # The type, optionally followed by the parameter's name.
        assert re.fullmatch(re.escape(expected) + r"(\s+\w+|(?<=&)\w+)?", param), (param, expected)
