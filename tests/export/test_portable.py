"""The portable file: save → load in a fresh process gives identical outputs; damaged, truncated,
crafted and future files are refused with one-line errors; a sparse model's file is small.

Oracles: the original model's outputs (bitwise), the file format as docs/export.md describes it
(re-implemented here to craft files with valid checksums), and nonzero counts taken from the
model itself.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cvsparse.export import load, save, shrink
from cvsparse.export.portable import (
    CorruptFileError,
    PortableFileError,
    RefusedContentError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from cvsparse.models import build_model

from .helpers import (
    Custom,
    kill_inner_channels,
    magnitude_prune,
    sparse_lenet5,
    sparse_lenet300,
    trained_bn,
    zoo_model,
)

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    lenet300 = magnitude_prune(build_model("lenet300"), 0.98)
    tv18 = trained_bn(torchvision.models.resnet18(num_classes=10))
    mnv2 = trained_bn(torchvision.models.mobilenet_v2(num_classes=10))
    r20 = kill_inner_channels(zoo_model("resnet20"), 0.5)
    r20_shrunk = shrink(r20, torch.randn(2, *CIFAR))
    assert r20_shrunk.get_submodule("layer1.0.conv1").out_channels < 16
    torch.manual_seed(1)
    return {
        "resnet20_shrunk": (r20_shrunk, torch.randn(2, *CIFAR)),
        "lenet300_sparse_layers": (sparse_lenet300(), torch.randn(3, *MNIST)),
        "lenet5_sparse_layers": (sparse_lenet5(), torch.randn(2, *MNIST)),
        "lenet300_sparse": (lenet300, torch.randn(3, *MNIST)),
        "lenet5": (zoo_model("lenet5"), torch.randn(2, *MNIST)),
        "resnet20": (zoo_model("resnet20"), torch.randn(2, *CIFAR)),
        "densenet40": (zoo_model("densenet40"), torch.randn(2, *CIFAR)),
        "tv_resnet18": (tv18, torch.randn(1, 3, 48, 48)),
        "tv_mobilenet_v2": (mnv2, torch.randn(1, 3, 40, 40)),
        "custom": (trained_bn(Custom()), torch.randn(2, 3, 10, 10)),
    }


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from cvsparse.export import load
    folder = Path(sys.argv[1])
    torch.set_num_threads(int(sys.argv[2]))   # the parent's: sums split as the parent split them
    for path in sorted(folder.glob("*.cvsp")):
        model = load(path)
        x = load_file(str(path.with_suffix(".in")))["x"]
        with torch.no_grad():
            out = model(x)
        out = out if isinstance(out, tuple) else (out,)
        save_file({str(i): t.contiguous() for i, t in enumerate(out)},
                  str(path.with_suffix(".out")))
    imported = sorted(m for m in sys.modules if m.startswith(
        ("cvsparse.models", "cvsparse.train", "cvsparse.methods", "torchvision", "tests")))
    print("imported:", imported)
""")


def test_fresh_process_reproduces_outputs_bit_for_bit(tmp_path):
    cases = _cases()
    expected = {}
    for name, (model, x) in cases.items():
        save(model, tmp_path / f"{name}.cvsp", example_input=x)
        save_file({"x": x}, str(tmp_path / f"{name}.in"))
        with torch.no_grad():
            out = model(x)
        expected[name] = out if isinstance(out, tuple) else (out,)
    # a fresh interpreter that imports only cvsparse (no model class, no training code)
    result = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path),
                             str(torch.get_num_threads())], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stdout
    for name, want in expected.items():
        got = load_file(str(tmp_path / f"{name}.out"))
        assert len(got) == len(want), name
        for i, w in enumerate(want):
            assert torch.equal(got[str(i)], w), f"{name}: output {i} differs"


def test_loaded_model_is_an_eval_graph_module_with_the_same_tensors(tmp_path):
    model = zoo_model("resnet20")
    save(model, tmp_path / "m.cvsp")
    loaded = load(tmp_path / "m.cvsp")
    assert not loaded.training and not any(m.training for m in loaded.modules())
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype, k


def test_the_file_is_plain_safetensors_with_a_json_spec(tmp_path):
    model = zoo_model("lenet5")
    path = tmp_path / "m.cvsp"
    save(model, path)
    with safe_open(str(path), framework="pt") as f:   # any safetensors reader opens it
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == "cvsparse-portable" and meta["version"] == "1"
    spec = json.loads(meta["spec"])
    types = {m["type"] for m in spec["modules"].values()}
    assert types == {"Conv2d", "MaxPool2d", "Flatten", "Linear", "ReLU"}
    assert spec["modules"]["body.0"]["args"]["out_channels"] == 20
    assert [n["op"] for n in spec["graph"]][0] == "placeholder"
    assert spec["graph"][-1]["op"] == "output"
    assert "body.0.weight" in names


# ---- crafting files as docs/export.md describes them ---------------------------------------------

def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _write(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """A file written per the documented format: safetensors, metadata ``sha256`` = SHA-256 of
    the whole file as written with that field set to 64 zeros."""
    metadata = {**metadata, "sha256": "0" * 64}
    save_file(tensors, str(path), metadata=metadata)
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    path.write_bytes(blob.replace(b'"sha256":"' + b"0" * 64 + b'"',
                                  b'"sha256":"' + digest.encode() + b'"', 1))


def _edit_spec(tmp_path: Path, edit) -> Path:
    src = tmp_path / "src.cvsp"
    save(zoo_model("lenet5"), src)
    metadata, tensors = _read(src)
    spec = json.loads(metadata["spec"])
    edit(spec)
    metadata["spec"] = json.dumps(spec)
    out = tmp_path / "crafted.cvsp"
    _write(out, metadata, tensors)
    return out


def test_a_file_rewritten_per_the_documented_format_loads(tmp_path):
    path = _edit_spec(tmp_path, lambda spec: None)
    x = torch.randn(2, *MNIST)
    with torch.no_grad():
        assert torch.equal(load(path)(x), zoo_model("lenet5")(x))


def _relu_node(spec: dict) -> dict:
    return next(n for n in spec["graph"] if n["op"] == "call_module"
                and spec["modules"][n["target"]]["type"] == "ReLU")


def _as_function(target: str, args: list):
    def edit(spec: dict) -> None:
        node = _relu_node(spec)
        node.update(op="call_function", target=target,
                    args={"tuple": args + [{"node": spec["graph"][0]["name"]}]})
    return edit


@pytest.mark.parametrize("edit, named", [
    (_as_function("os.system", ["touch pwned"]), "os.system"),
    (_as_function("builtins.eval", ["__import__('os').system('touch pwned')"]),
     "builtins.eval"),
    (_as_function("torch.load", ["x.pt"]), "torch.load"),
    (lambda spec: spec["modules"]["body.5"].update(type="subprocess.Popen",
                                                   args={"args": "touch pwned"}),
     "subprocess.Popen"),
    (lambda spec: _relu_node(spec).update(op="call_method", target="register_forward_hook"),
     "register_forward_hook"),
    (lambda spec: _relu_node(spec).update(
        op="call_function", target="builtins.getattr",
        args={"tuple": [{"node": "x"}, "__class__"]}), "getattr"),
    (lambda spec: _relu_node(spec).update(op="call_other"), "call_other"),
])
def test_crafted_targets_outside_the_whitelist_are_refused(tmp_path, monkeypatch, edit, named):
    monkeypatch.chdir(tmp_path)
    path = _edit_spec(tmp_path, edit)
    with pytest.raises(RefusedContentError, match="whitelist|refused") as info:
        load(path)
    message = str(info.value)
    assert named in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("edit", [
    lambda spec: spec["modules"]["body.0"]["args"].update(out_channels=21),   # shape mismatch
    lambda spec: spec["modules"]["body.0"]["args"].update(stride={"set": [1]}),
    lambda spec: spec["graph"][1]["args"]["tuple"].__setitem__(0, {"node": "nowhere"}),
    lambda spec: spec["graph"].pop(),                                         # no output
    lambda spec: spec["graph"][1].update(target="body.9"),
    lambda spec: spec["graph"][1].update(name="a; import os"),
    lambda spec: spec["graph"][0].update(target="x=__import__('os')"),
    lambda spec: spec["modules"].update({"body.0.weight": spec["modules"]["body.0"]}),
    lambda spec: spec.pop("tensors"),
    lambda spec: spec["tensors"]["body.0.weight"].update(shape=[20, 1, 5, 4]),
])
def test_inconsistent_specs_are_corrupt_files(tmp_path, edit):
    path = _edit_spec(tmp_path, edit)
    with pytest.raises(CorruptFileError) as info:
        load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_an_unknown_format_version_is_refused(tmp_path):
    src = tmp_path / "src.cvsp"
    save(zoo_model("lenet5"), src)
    metadata, tensors = _read(src)
    metadata["version"] = "2"
    _write(tmp_path / "v2.cvsp", metadata, tensors)
    with pytest.raises(UnsupportedVersionError, match="version '2'.*reads version 1"):
        load(tmp_path / "v2.cvsp")


def test_inconsistent_csr_arrays_are_refused(tmp_path):
    src = tmp_path / "src.cvsp"
    save(magnitude_prune(build_model("lenet300"), 0.98), src)
    metadata, tensors = _read(src)
    cols = tensors["body.1.weight/cols"].to(torch.int32)
    cols[0] = 784                                           # one past the last column
    tensors["body.1.weight/cols"] = cols
    _write(tmp_path / "bad.cvsp", metadata, tensors)
    with pytest.raises(CorruptFileError, match="inconsistent CSR"):
        load(tmp_path / "bad.cvsp")


# ---- truncation and bit flips --------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("saved") / "m.cvsp"
    save(magnitude_prune(build_model("lenet300"), 0.9), path)
    return path, path.read_bytes()


def test_truncated_files_are_clear_errors(saved, tmp_path):
    _, blob = saved
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    lengths = sorted({0, 3, 8, 9, 100, header_end - 1, header_end, header_end + 1,
                      len(blob) // 2, len(blob) - 4, len(blob) - 1})
    for n in lengths:
        path = tmp_path / f"cut{n}.cvsp"
        path.write_bytes(blob[:n])
        with pytest.raises(CorruptFileError, match="truncated|corrupt") as info:
            load(path)
        assert "\n" not in str(info.value), n


def test_bit_flips_anywhere_are_clear_errors(saved, tmp_path):
    _, blob = saved
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    spec_at = blob.find(b'"spec"')
    sha_at = blob.find(b'"sha256":"') + 12
    version_at = blob.find(b'"version":"') + 11
    offsets = sorted({0, 1, 7, 9, 20, spec_at + 30, sha_at, sha_at + 40, version_at,
                      header_end - 2, header_end, header_end + 1, len(blob) - 1,
                      *range(header_end, len(blob), len(blob) // 29),
                      *range(10, header_end, header_end // 17)})
    for i, at in enumerate(offsets):
        for bit in (0, 6):
            damaged = bytearray(blob)
            damaged[at] ^= 1 << bit
            path = tmp_path / f"flip{i}_{bit}.cvsp"
            path.write_bytes(bytes(damaged))
            with pytest.raises(PortableFileError) as info:
                load(path)
            assert isinstance(info.value, ValueError)
            assert "\n" not in str(info.value), (at, bit)


def test_a_missing_file_and_a_foreign_file_are_clear_errors(tmp_path):
    with pytest.raises(CorruptFileError, match="no portable model file"):
        load(tmp_path / "none.cvsp")
    save_file({"w": torch.ones(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CorruptFileError, match="not a cvsparse portable model file"):
        load(tmp_path / "plain.safetensors")
    torch.save({"w": torch.ones(3)}, tmp_path / "pickle.pt")
    with pytest.raises(CorruptFileError):
        load(tmp_path / "pickle.pt")


# ---- size -------------------------------------------------------------------------------------

def test_a_98_percent_sparse_lenet300_file_meets_the_size_bound(tmp_path):
    model = magnitude_prune(build_model("lenet300"), 0.98)
    params = list(model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in params)
    weight_nonzero = sum(int(m.weight.count_nonzero()) for m in model.modules()
                         if isinstance(m, nn.Linear))
    assert weight_nonzero / sum(m.weight.numel() for m in model.modules()
                                if isinstance(m, nn.Linear)) == pytest.approx(0.02, abs=1e-3)
    path = tmp_path / "m.cvsp"
    size = save(model, path, example_input=torch.randn(2, *MNIST))
    blob = path.read_bytes()
    header = 8 + struct.unpack("<Q", blob[:8])[0]
    assert size == len(blob)
    assert header <= 6144                                   # the small header
    index_bytes = 4 * weight_nonzero                        # one int32 index per stored weight
    assert len(blob) <= 1.2 * (4 * nonzero + index_bytes) + header
    dense = sum(p.numel() for p in params) * 4
    assert len(blob) < dense / 25


# ---- what save refuses ------------------------------------------------------------------------

class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class _Sorter(nn.Module):
    def forward(self, x):
        return torch.sort(x).values


class _Conv2dSub(nn.Conv2d):
    """A subclass is not its base layer: it is traced through (its F.conv2d is whitelisted)."""


def test_save_names_what_it_cannot_describe(tmp_path):
    with pytest.raises(UnsupportedModelError, match="cannot trace"):
        save(_Branchy(), tmp_path / "a.cvsp")
    with pytest.raises(UnsupportedModelError, match="torch.sort|sort.*whitelist"):
        save(_Sorter(), tmp_path / "b.cvsp")
    with pytest.raises(UnsupportedModelError, match="LSTM.*whitelist"):
        save(nn.Sequential(nn.LSTM(3, 3)), tmp_path / "c.cvsp")
    assert not list(tmp_path.iterdir())


def test_a_subclassed_layer_is_traced_through(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_Conv2dSub(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    save(model, tmp_path / "m.cvsp", example_input=x)
    loaded = load(tmp_path / "m.cvsp")
    assert not any(type(m) is _Conv2dSub for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _mutate(value, rng, depth=0):
    """``value`` with one randomly chosen leaf or container replaced by junk."""
    junk = [None, -1, 0, 2**40, 1.5, "x", "body.0", [], {}, [1, 2], {"tuple": 3},
            {"node": "x"}, {"dtype": "float32"}, True]
    if isinstance(value, dict) and value and rng.random() < 0.85:
        key = rng.choice(sorted(value))
        return {**value, key: _mutate(value[key], rng, depth + 1)}
    if isinstance(value, list) and value and rng.random() < 0.85:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate(value[i], rng, depth + 1)] + value[i + 1:]
    return rng.choice(junk)


def test_random_spec_mutations_with_valid_checksums_are_refused_or_load(tmp_path):
    """A crafted file can carry any JSON with a correct checksum: every mutation either loads
    or is a one-line PortableFileError, never another exception."""
    import random

    rng = random.Random(0)
    src = tmp_path / "src.cvsp"
    save(zoo_model("resnet20"), src)
    metadata, tensors = _read(src)
    spec = json.loads(metadata["spec"])
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(150):
        path = tmp_path / f"fuzz{i}.cvsp"
        _write(path, {**metadata, "spec": json.dumps(_mutate(spec, rng))}, tensors)
        try:
            load(path)
            outcomes["loaded"] += 1
        except PortableFileError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100


def test_docs_list_the_whole_whitelist():
    """docs/export.md names every module type, function and tensor method load accepts."""
    from cvsparse.export.portable import TENSOR_METHODS, function_table, module_types

    doc = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text()
    for name in module_types():
        assert f"`{name}`" in doc, name
    for name in function_table():
        short = name.rsplit(".", 1)[-1]
        assert f"`{name}`" in doc or f"`{short}`" in doc, name
    for name in TENSOR_METHODS:
        assert f"`{name}`" in doc, name


def test_metadata_is_stored_and_read_back(tmp_path):
    from cvsparse.export.portable import read_spec

    meta = {"model": "lenet5", "normalization": {"mean": [0.13], "std": [0.31]}}
    save(zoo_model("lenet5"), tmp_path / "m.cvsp", metadata=meta)
    info = read_spec(tmp_path / "m.cvsp")
    assert info["version"] == 1 and info["spec"]["metadata"] == meta
    with pytest.raises(UnsupportedModelError, match="plain JSON"):
        save(zoo_model("lenet5"), tmp_path / "n.cvsp", metadata={"x": torch.ones(1)})
    with pytest.raises(UnsupportedModelError, match="plain JSON"):
        save(zoo_model("lenet5"), tmp_path / "n.cvsp", metadata={"x": float("nan")})


def test_sparse_layers_are_stored_packed_and_rebuilt(tmp_path):
    from cvsparse.nn import SparseConv2d, SparseLinear

    model = sparse_lenet5()
    path = tmp_path / "m.cvsp"
    save(model, path)
    spec = json.loads(_read(path)[0]["spec"])
    assert spec["modules"]["0"]["type"] == "cvsparse.SparseConv2d"
    assert spec["modules"]["0"]["args"]["pool"] == 2 and spec["modules"]["2"]["args"]["pool"] == 1
    assert spec["modules"]["5"]["args"] == {"in_features": 800, "out_features": 500,
                                            "relu": True}
    loaded = load(path)
    assert type(loaded.get_submodule("0")) is SparseConv2d
    assert type(loaded.get_submodule("5")) is SparseLinear
    assert loaded.get_submodule("0").pool == 2
    for name in ("values", "col_deltas", "row_ptr", "bias"):
        a, b = getattr(model[5], name), getattr(loaded.get_submodule("5"), name)
        assert torch.equal(a, b) and a.dtype == b.dtype, name


def test_a_sparse_layer_file_meets_the_size_bound(tmp_path):
    model = sparse_lenet300()
    values = sum(m.values.numel() for m in model if hasattr(m, "values"))
    biases = sum(m.bias.numel() for m in model if hasattr(m, "values"))
    index_bytes = sum(m.col_deltas.numel() * 4 + m.row_ptr.numel() * 4 for m in model
                      if hasattr(m, "values"))              # their int32 in-memory indices
    path = tmp_path / "m.cvsp"
    save(model, path)
    blob = path.read_bytes()
    header = 8 + struct.unpack("<Q", blob[:8])[0]
    assert header <= 6144
    assert len(blob) <= 1.2 * (4 * (values + biases) + index_bytes) + header


def test_an_inconsistent_packed_layer_is_refused(tmp_path):
    src = tmp_path / "src.cvsp"
    save(sparse_lenet300(), src)
    metadata, tensors = _read(src)
    spec = json.loads(metadata["spec"])
    row_ptr = tensors["2.row_ptr"].to(torch.int32)
    row_ptr[5] = row_ptr[-1] + 7                             # past the last value
    tensors["2.row_ptr"] = row_ptr
    spec["tensors"]["2.row_ptr"].pop("stored_dtype", None)
    metadata["spec"] = json.dumps(spec)
    _write(tmp_path / "bad.cvsp", metadata, tensors)
    with pytest.raises(CorruptFileError, match="SparseLinear") as info:
        load(tmp_path / "bad.cvsp")
    assert "\n" not in str(info.value)


def test_a_crafted_shape_cannot_make_load_allocate_without_bound(tmp_path):
    def huge(spec: dict) -> None:
        spec["modules"]["body.5"]["args"].update(in_features=2**20, out_features=2**16)
        spec["tensors"]["body.5.weight"].update(encoding="csr", shape=[2**16, 2**20],
                                                values="x", row_ptr="x", cols="x")

    path = _edit_spec(tmp_path, huge)                     # 256 GiB from a 1.7 MB file
    with pytest.raises(RefusedContentError, match=r"expand to 274,877,9\d\d,\d{3} bytes"):
        load(path)


@pytest.mark.parametrize("name", ["vgg16", "resnet32", "resnet56", "resnet110"])
def test_the_rest_of_the_zoo_round_trips(tmp_path, name):
    """The zoo models the fresh-process test leaves out, in this process (same code path)."""
    model = zoo_model(name)
    x = torch.randn(1, *CIFAR)
    save(model, tmp_path / "m.cvsp", example_input=x)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.cvsp")(x), model(x))
