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
    """Multiply-adds of every Conv2d / Linear (dense: all weights; sparse: the nonzeros)."""
    total = 0

    def hook(module, args, out):
        nonlocal total
        pixels = out.numel() // out.shape[1] if out.dim() == 4 else out.numel() // out.shape[-1]
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
    report = sparsify(sparse, min_sparsity=0.7, example_input=x)
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
