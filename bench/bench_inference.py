"""CPU inference benchmarks of sparsified models: the dense model against the same model after
``cvsparse.export.sparsify`` (sparse layers where they measure faster), float32,
``torch.inference_mode``, default threads.

Models and per-layer profiles (kept weights per layer, applied as a random unstructured mask of
exactly that many weights; the timing of both kernels depends only on the counts and shapes):

* **LeNet-300-100** at the README quick start's profile (50.5x, ≈ 98% sparse): ``body.1``
  (300x784) 98.34% pruned, ``body.3`` (100x300) 96.19%, ``body.5`` (10x100) 76.80%.
  Targets: ≥ 3x at batch 1, ≥ 5x at batch 64.
* **LeNet-5** at the cvgrad recipe's profile (``configs/mnist_lenet5.yaml``, seed 0, 115x,
  RESULTS.md): conv1 296 of 500 weights, conv2 1,134 of 25,000, fc1 1,767 of 400,000, fc2 481
  of 5,000.  Target: ≥ 3x at batch 64.
* **VGG-16 (CIFAR-10)** at a cvgrad-like profile, 95.1% sparse overall: density falls with depth
  as in L1-regularized VGG-16 runs (the early, wide-image layers keep the most; the 512-channel
  layers the least) — kept fractions :data:`VGG16_DENSITY`.  BatchNorm has random "trained"
  statistics.  Target: ≥ 2.5x at batch 1 and 64.

Method: the dense model runs between the rounds of the sparse model's pytest-benchmark run
(``Paired`` from ``conftest.py``, without the cache scrub: inference serves repeated requests,
and the weights of both models stay where the previous request left them), and the asserted
speed-up is the ratio of the medians of these interleaved samples.  Each case reports it beside
the MAC ratio (dense MACs / MACs of the deployed model: nonzeros x output pixels for sparse
layers, full for layers sparsify kept dense) and sparsify's per-layer choices and timings.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Paired
from torch import nn

from cvsparse.export.sparsify import sparsify
from cvsparse.models.lenet import LeNet5, LeNet300
from cvsparse.models.vgg import VGG16
from cvsparse.nn import SparseConv2d, SparseLinear

# Every Conv2d / Linear at least this sparse is timed; sparsify keeps the faster of the two.
MIN_SPARSITY = 0.3
LENET300_PRUNED = {"body.1": 0.9834, "body.3": 0.9619, "body.5": 0.7680}
LENET5_KEPT = {"body.0": 296, "body.2": 1134, "body.5": 1767, "body.7": 481}
# Kept fraction of the 13 convolutions (3->64 ... 512->512) and the two linear layers.
VGG16_DENSITY = [0.50, 0.30, 0.30, 0.25, 0.20, 0.15, 0.12, 0.08, 0.04, 0.03, 0.02, 0.02, 0.03,
                 0.05, 0.30]


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _keep(model: nn.Module, kept: dict[str, int]) -> nn.Module:
    """Zeros all but ``kept[name]`` randomly chosen weights of each named layer."""
    with torch.no_grad():
        for name, layer in _layers(model):
            if name in kept:
                flat = layer.weight.view(-1)
                flat[torch.randperm(flat.numel())[kept[name]:]] = 0
    return model


def lenet300() -> nn.Module:
    model = LeNet300()
    return _keep(model, {n: round(m.weight.numel() * (1 - LENET300_PRUNED[n]))
                         for n, m in _layers(model)})


def lenet5() -> nn.Module:
    return _keep(LeNet5(), LENET5_KEPT)


def vgg16() -> nn.Module:
    model = VGG16()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    layers = _layers(model)
    return _keep(model, {n: round(m.weight.numel() * d)
                         for (n, m), d in zip(layers, VGG16_DENSITY, strict=True)})


CASES = {
    # name: (builder, input shape without batch, batch, target speed-up, rounds)
    "lenet300-b1": (lenet300, (1, 28, 28), 1, 3.0, 400),
    "lenet300-b64": (lenet300, (1, 28, 28), 64, 5.0, 200),
    "lenet5-b64": (lenet5, (1, 28, 28), 64, 3.0, 100),
    "vgg16-b1": (vgg16, (3, 32, 32), 1, 2.5, 40),
    "vgg16-b64": (vgg16, (3, 32, 32), 64, 2.5, 8),
}


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every Conv2d / Linear (dense: all weights; sparse: the nonzeros), per
    output pixel of the convolution itself (before a pool fused into a SparseConv2d)."""
    total = 0

    def hook(module, args, out):
        nonlocal total
        if out.dim() == 4:
            batch, _, height, width = args[0].shape
            (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
            pixels = batch * ((height + 2 * ph - kh) // sh + 1) * ((width + 2 * pw - kw) // sw + 1)
        else:
            pixels = out.numel() // out.shape[-1]
        if isinstance(module, (SparseLinear, SparseConv2d)):
            total += module.nnz * pixels
        else:  # groups = 1 throughout these models
            total += module.weight.numel() * pixels

    kinds = (nn.Conv2d, nn.Linear, SparseLinear, SparseConv2d)
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparsified_speedup(benchmark, case):
    build, shape, batch, target, rounds = CASES[case]
    torch.manual_seed(0)
    dense = build().eval()
    x = torch.randn(batch, *shape)
    sparse = copy.deepcopy(dense)
    report = sparsify(sparse, min_sparsity=MIN_SPARSITY, example_input=x)
    with torch.inference_mode():
        want, got = dense(x), sparse(x)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        paired = Paired({"dense": lambda: dense(x)}, lambda: None)
        for _ in range(3):  # warm-up
            dense(x)
            sparse(x)
        benchmark.pedantic(lambda: sparse(x), setup=paired.setup, rounds=rounds)
    t_sparse, t_dense = benchmark.stats.stats.median, paired.median("dense")
    speedup = t_dense / t_sparse
    mac_ratio = _macs(dense, x) / _macs(sparse, x)
    benchmark.extra_info |= {
        "threads": torch.get_num_threads(), "median_ms[dense]": round(t_dense * 1e3, 4),
        "median_ms[sparse]": round(t_sparse * 1e3, 4), "speedup": round(speedup, 2),
        "mac_ratio": round(mac_ratio, 2), "replaced": report.replaced,
        "sparsify": report.to_dict()["layers"],
    }
    print(f"\n{case}: dense {t_dense * 1e3:.4f} ms, sparse {t_sparse * 1e3:.4f} ms, speed-up "
          f"{speedup:.2f}x, MAC ratio {mac_ratio:.2f}x\n{report}")
    assert speedup >= target


# At batch 1 LeNet-300's forward is mostly framework time: Python module calls and operator
# dispatch cost as much as the three GEMVs in the dense model and far more than the sparse
# products.  A TorchScript trace runs the same operators without the Python layer; both models
# are traced here and every ratio is reported (traced dense / traced sparse is the like-for-like
# one).  Asserted: the traced sparse model gives the eager one's outputs (another batch size
# included) and is faster than the eager sparse model.

TRACED_ROUNDS = 400


def test_traced_lenet300_batch1(benchmark):
    import warnings

    build, shape, batch, _, _ = CASES["lenet300-b1"]
    torch.manual_seed(0)
    dense = build().eval()
    x = torch.randn(batch, *shape)
    sparse = copy.deepcopy(dense)
    sparsify(sparse, min_sparsity=MIN_SPARSITY, example_input=x)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = {"dense": torch.jit.trace(dense, x), "sparse": torch.jit.trace(sparse, x)}
    with torch.inference_mode():
        for batch_x in (x, torch.randn(5, *shape)):
            assert torch.allclose(traced["sparse"](batch_x), sparse(batch_x), atol=1e-6)
        paired = Paired({"eager_dense": lambda: dense(x), "eager_sparse": lambda: sparse(x),
                         "traced_dense": lambda: traced["dense"](x)}, lambda: None)
        for _ in range(20):  # warm-up (TorchScript profiles its first runs)
            paired.setup()
            traced["sparse"](x)
        paired = Paired(paired.baselines, lambda: None)
        benchmark.pedantic(lambda: traced["sparse"](x), setup=paired.setup, rounds=TRACED_ROUNDS)
    t = {name: paired.median(name) for name in paired.baselines}
    t["traced_sparse"] = benchmark.stats.stats.median
    ratios = {"traced": t["traced_dense"] / t["traced_sparse"],
              "eager": t["eager_dense"] / t["eager_sparse"],
              "traced_sparse_vs_eager_dense": t["eager_dense"] / t["traced_sparse"]}
    benchmark.extra_info |= {f"median_us[{k}]": round(v * 1e6, 2) for k, v in t.items()}
    benchmark.extra_info |= {f"speedup[{k}]": round(v, 2) for k, v in ratios.items()}
    print("\nlenet300-b1 " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in t.items()) + "; "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    assert t["traced_sparse"] < t["eager_sparse"]


# ===================================================================== ResNet-56 shrink
# cvsparse.export.shrink on ResNet-56 (cvsparse.models) with about half of every block's inner
# channels dead, against the same channels removed by Torch-Pruning (the peer), at batch 64.
# Both memory formats (NCHW and channels-last), default threads, ``torch.inference_mode``; the
# dense model and the peer run between the shrunk model's rounds (``Paired`` without the cache
# scrub, as above) and the ratios are ratios of the medians of these interleaved samples.
# Asserted: equal outputs (1e-5 relative to the masked model), the shrunk model at least
# SHRINK_SPEEDUP x faster than the dense one, and no slower than the peer (10% noise margin).
# The MAC ratio is reported beside the measured speed-up (benchmark.extra_info, bench/README.md).

SHRINK_BATCH = 64
SHRINK_ROUNDS = 10
SHRINK_SPEEDUP = 1.8
SHRINK_NOISE = 1.10


def _resnet56_half_inner(seed: int = 0):
    """``(dense, masked, dead)``: ResNet-56 with "trained" BatchNorm (random γ, β, running
    statistics), and a copy in which each of the 27 blocks has half of its inner channels
    (``conv1``'s outputs, ``dead[i]``) dead — their ``conv1`` rows and ``conv2`` columns zero."""
    import copy

    from torch import nn

    from cvsparse.models import build_model

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dense = build_model("resnet56").eval()
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    masked = copy.deepcopy(dense)
    dead = []
    with torch.no_grad():
        for block in _blocks(masked):
            n = block.conv1.out_channels
            idx = torch.randperm(n, generator=g)[: n // 2].sort().values
            block.conv1.weight[idx] = 0
            block.conv2.weight[:, idx] = 0
            dead.append(idx.tolist())
    return dense, masked, dead


def _blocks(model):
    return [block for stage in (model.layer1, model.layer2, model.layer3) for block in stage]


@pytest.fixture(scope="module")
def resnet56_shrink():
    """The dense, masked, cvsparse-shrunk and Torch-Pruning-pruned ResNet-56 and a batch."""
    import copy

    import torch_pruning as tp

    from cvsparse.export import shrink

    dense, masked, dead = _resnet56_half_inner()
    example = torch.randn(1, 3, 32, 32)
    shrunk = shrink(masked, example)
    peer = copy.deepcopy(masked)
    graph = tp.DependencyGraph().build_dependency(peer, example_inputs=example)
    for block, idx in zip(_blocks(peer), dead, strict=True):
        graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=idx).prune()
    x = torch.randn(SHRINK_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return dict(dense=dense, masked=masked, shrunk=shrunk, peer=peer.eval(), x=x)


def test_resnet56_shrink_outputs(resnet56_shrink):
    m, x = resnet56_shrink, resnet56_shrink["x"]
    with torch.inference_mode():
        want = m["masked"](x)
        for name in ("shrunk", "peer"):
            err = (m[name](x) - want).abs().max().item()
            assert err <= 1e-5 * want.abs().max().item(), (name, err)
    shapes = [tuple(p.shape) for p in m["shrunk"].parameters()]
    assert shapes == [tuple(p.shape) for p in m["peer"].parameters()]


@pytest.fixture(params=["threads_default", "threads_1"])
def shrink_threads(request):
    """Default threads, or one: on a machine whose other core is busy, every parallel region
    of a two-thread run waits for a descheduled thread, and one thread measures the models."""
    threads = torch.get_num_threads()
    if request.param == "threads_1":
        torch.set_num_threads(1)
    yield torch.get_num_threads()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_resnet56_shrink_latency(benchmark, resnet56_shrink, memory_format, shrink_threads):
    from cvsparse.metrics import count_flops

    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[
        memory_format]
    m = {k: v.to(memory_format=fmt) for k, v in resnet56_shrink.items() if k != "x"}
    x = resnet56_shrink["x"].contiguous(memory_format=fmt)
    macs = {k: sum(f.flops_dense for f in count_flops(m[k], (3, 32, 32))) // 2
            for k in ("dense", "shrunk")}
    with torch.inference_mode():
        pair = Paired({"dense": lambda: m["dense"](x), "torch_pruning": lambda: m["peer"](x)},
                      lambda: None)
        for _ in range(2):  # warm-up
            for model in m.values():
                model(x)
        benchmark.pedantic(lambda: m["shrunk"](x), setup=pair.setup, rounds=SHRINK_ROUNDS)
    shrunk_s = benchmark.stats.stats.median
    speedup = pair.median("dense") / shrunk_s
    vs_peer = pair.median("torch_pruning") / shrunk_s
    benchmark.extra_info |= {
        "threads": torch.get_num_threads(),
        "median_ms[dense]": round(1e3 * pair.median("dense"), 3),
        "median_ms[shrunk]": round(1e3 * shrunk_s, 3),
        "median_ms[torch_pruning]": round(1e3 * pair.median("torch_pruning"), 3),
        "speedup": round(speedup, 3), "torch_pruning/shrunk": round(vs_peer, 3),
        "mac_ratio": round(macs["dense"] / macs["shrunk"], 3),
    }
    print(f"\nresnet56-shrink-b{SHRINK_BATCH} ({memory_format}): {benchmark.extra_info}")
    assert vs_peer * SHRINK_NOISE >= 1.0, benchmark.extra_info
    assert speedup >= SHRINK_SPEEDUP, benchmark.extra_info
