"""A portable, pickle-free model file: ``save(model, path)`` / ``load(path)``.

The file is a valid `safetensors <https://huggingface.co/docs/safetensors>`_ file.  Its tensors
are the model's parameters and buffers (zero-heavy ones in a CSR encoding); its
``__metadata__`` holds

- ``format`` — ``"cvsparse-portable"``;
- ``version`` — the format version (:data:`FORMAT_VERSION`);
- ``spec`` — a JSON architecture spec: every module with its type (a name from a fixed
  whitelist) and its constructor arguments, the ``torch.fx`` graph that connects them (only
  whitelisted functions and tensor methods), and how each tensor is encoded;
- ``sha256`` — SHA-256 of the whole file as written with this field set to 64 zeros.

:func:`load` checks the checksum before it parses anything else, rebuilds every module from the
whitelist alone (it never imports a module or resolves a name found in the file, so a crafted
file cannot run code) and returns an ``fx.GraphModule`` with the saved outputs.  Every problem
with a file is a one-line :class:`PortableFileError` (a ValueError).  The format is described
in docs/export.md.

    from cvsparse.export import save, load
    save(model.eval(), "model.cvsp", example_input=torch.randn(1, 3, 32, 32))
    model = load("model.cvsp")
"""

from __future__ import annotations

from .errors import (
    CorruptFileError,
    PortableFileError,
    RefusedContentError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from .file import FORMAT, FORMAT_VERSION, load, read_spec, save
from .rebuild import MAX_EXPANSION
from .whitelist import TENSOR_METHODS, ModuleType, function_table, module_types

__all__ = [
    "FORMAT", "FORMAT_VERSION", "PortableFileError", "CorruptFileError",
    "UnsupportedVersionError", "RefusedContentError", "UnsupportedModelError", "ModuleType",
    "module_types", "function_table", "TENSOR_METHODS", "MAX_EXPANSION", "save", "load",
    "read_spec",
]
