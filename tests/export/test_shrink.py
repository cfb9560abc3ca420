"""cvsparse.export.shrink against its oracle, the masked model it came from: the shrunk model's
outputs (eval mode, random inputs) equal the masked model's within 1e-5 relative, for the zoo
and three torchvision models, with random dead channels, plain and "trained" BatchNorm.

Tolerance: shrinking drops terms that are exactly zero and folds constants (computed in float64)
into biases, so the two float32 models differ only by the order of their sums: a few float32
ulps (≈ 1e-7 relative) per layer, far below 1e-5 even over 110 layers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import Tensor, nn

from cvsparse.export import shrink, summary
from cvsparse.export.summary import FIELDS, format_summary
from cvsparse.models import build_model

RTOL = 1e-5
LAYERS = (nn.Conv2d, nn.Linear)

# model: (input shape, layer made all zero, layer reduced to one channel)
ZOO = {
    "lenet300": ((1, 28, 28), "body.1", "body.3"),
    "lenet5": ((1, 28, 28), "body.0", "body.5"),
    "vgg16": ((3, 32, 32), "features.7", "features.14"),
    "resnet20": ((3, 32, 32), "layer2.1.conv1", "layer3.0.conv1"),
    "resnet32": ((3, 32, 32), "layer2.1.conv1", "layer3.0.conv1"),
    "resnet56": ((3, 32, 32), "layer2.1.conv1", "layer3.0.conv1"),
    "resnet110": ((3, 32, 32), "layer2.1.conv1", "layer3.0.conv1"),
    "densenet40": ((3, 32, 32), "features.3.conv", "features.13.conv"),
    "resnet18": ((3, 32, 32), "layer2.0.conv1", "layer3.1.conv1"),
    "mobilenet_v2": ((3, 32, 32), "features.3.conv.0.0", "features.5.conv.1.0"),
    "densenet121": ((3, 32, 32), "features.denseblock2.denselayer3.conv2",
                    "features.denseblock3.denselayer5.conv1"),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these small forward passes gain nothing from two, and on a shared
    machine a busy second core makes every parallel region wait for it (a 10-50x slowdown)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str) -> nn.Module:
    if hasattr(torchvision.models, name) and name not in ("vgg16",):
        return getattr(torchvision.models, name)(num_classes=10)
    return build_model(name)


def _train_bn(model: nn.Module, g: torch.Generator) -> None:
    """Random γ, β, running statistics and biases, as after training: a dead channel then
    emits a nonzero constant after its BatchNorm."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g))
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        elif isinstance(m, LAYERS) and m.bias is not None:
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def _kill(layer: nn.Module, rows: Tensor) -> None:
    layer.weight[rows] = 0


@torch.no_grad()
def _masked(name: str, trained: bool, seed: int = 0) -> nn.Module:
    """``name`` with whole output channels zeroed: about half of the layers lose 25–75% of
    their channels, one layer all of them, one all but one; the classifier is left alone."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = _build(name)
    _, dead_layer, one_layer = ZOO[name]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)][:-1]
    for n, m in layers:
        out = m.weight.shape[0]
        if n == dead_layer:
            _kill(m, torch.arange(out))
        elif n == one_layer:
            _kill(m, torch.randperm(out, generator=g)[1:])
        elif torch.rand((), generator=g) < 0.5:
            frac = 0.25 + 0.5 * float(torch.rand((), generator=g))
            _kill(m, torch.randperm(out, generator=g)[: int(frac * out)])
    if trained:
        _train_bn(model, g)
    return model.eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...], seed: int = 1):
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want, got = a(x), b(x)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= RTOL * want.abs().max().item(), err


def _shrink(model: nn.Module, shape: tuple[int, ...], **kw) -> tuple[nn.Module, list[str]]:
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = shrink(model, x, **kw)
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("trained", [False, True], ids=["plain_bn", "trained_bn"])
@pytest.mark.parametrize("name", list(ZOO))
def test_shrink_matches_masked_model(name, trained):
    shape, dead_layer, one_layer = ZOO[name]
    model = _masked(name, trained)
    before = copy.deepcopy(model.state_dict())
    small, messages = _shrink(model, shape)

    _assert_same_outputs(model, small, shape)
    _assert_same_outputs(model, small, shape, seed=2)
    assert _params(small) < _params(model)
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key]), key
    if not trained:  # every dead channel reads as 0 after BN: removed, down to one per layer
        assert small.get_submodule(one_layer).weight.shape[0] == 1
        assert small.get_submodule(dead_layer).weight.shape[0] == 1
        assert any(repr(dead_layer) in m and "keeping one" in m for m in messages), messages


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "densenet40"])
def test_round_to(name):
    shape = ZOO[name][0]
    model = _masked(name, trained=False, seed=3)
    plain, _ = _shrink(model, shape)
    rounded, _ = _shrink(model, shape, round_to=8)
    _assert_same_outputs(model, rounded, shape)
    original = dict(model.named_modules())
    for n, m in rounded.named_modules():
        if isinstance(m, LAYERS):
            count = m.weight.shape[0]
            assert count % 8 == 0 or count == original[n].weight.shape[0], (n, count)
            assert count >= plain.get_submodule(n).weight.shape[0]
    assert _params(plain) <= _params(rounded) < _params(model)


@torch.no_grad()
def test_round_to_keeps_the_largest_extra_channels():
    # channels 0..5 are unread (zero columns downstream) with growing norms; 6..9 are live
    model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    for i in range(10):
        model[0].weight[i] = (i + 1) * 0.1
    model[2].weight[:, :6] = 0
    small, _ = _shrink(model, (5,), round_to=8)
    kept = small.get_submodule("0").weight[:, 0]
    assert torch.allclose(kept, torch.arange(3, 11) * 0.1)  # 2..5 put back, 0 and 1 not
    _assert_same_outputs(model, small, (5,))


@torch.no_grad()
def test_linear_consumer_folds_the_constant():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[0].weight[[2, 5]] = 0
    model[0].bias[2], model[0].bias[5] = 0.7, -0.3  # constants relu(0.7) = 0.7 and 0
    small, _ = _shrink(model, (6,))
    assert small.get_submodule("0").weight.shape == (6, 6)
    assert small.get_submodule("2").weight.shape == (3, 6)
    expected = model[2].bias + 0.7 * model[2].weight[:, 2]
    assert torch.allclose(small.get_submodule("2").bias, expected, atol=1e-6)
    _assert_same_outputs(model, small, (6,))


def _conv_bn(consumer: nn.Conv2d, dead: int = 3) -> nn.Module:
    """conv 3×3 → trained BN → ReLU → ``consumer``; channel ``dead`` has zero weights and a
    positive constant after BN and ReLU."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), consumer).eval()
    with torch.no_grad():
        _train_bn(model, g)
        model[0].weight[dead] = 0
        model[1].bias[dead] = 2.0 + abs(float(model[1].running_mean[dead]))
    return model


@pytest.mark.parametrize(
    "consumer, removed",
    [(lambda: nn.Conv2d(8, 4, 1), True),               # 1×1: folded into the bias
     (lambda: nn.Conv2d(8, 4, 3, bias=False), True),   # k×k, no padding: folded (bias added)
     (lambda: nn.Conv2d(8, 4, 3, padding=1), False),   # zero padding would see the constant
     (lambda: nn.Conv2d(8, 4, 3, padding=1, padding_mode="replicate"), True)],
    ids=["1x1", "3x3_pad0", "3x3_pad1_kept", "3x3_replicate"],
)
def test_conv_consumer_folds_only_when_exact(consumer, removed):
    torch.manual_seed(0)
    model = _conv_bn(consumer())
    small, _ = _shrink(model, (3, 9, 9))
    assert small.get_submodule("3").weight.shape[1] == (7 if removed else 8)
    assert small.get_submodule("1").num_features == (7 if removed else 8)
    _assert_same_outputs(model, small, (3, 9, 9))


@torch.no_grad()
def test_zero_constant_before_padded_conv_is_removed():
    torch.manual_seed(0)
    model = _conv_bn(nn.Conv2d(8, 4, 3, padding=1))
    model[1].bias[3] = -5.0 - abs(float(model[1].running_mean[3]))  # relu → exactly 0
    small, _ = _shrink(model, (3, 9, 9))
    assert small.get_submodule("3").weight.shape[1] == 7
    _assert_same_outputs(model, small, (3, 9, 9))


class _Residual(nn.Module):
    """Two conv → BN branches added, ReLU, then a 1×1 or 3×3 head: ``(N, 3, H, W) → (N, 4, H,
    W)``."""

    def __init__(self, head_kernel: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, head_kernel, padding=head_kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


@pytest.mark.parametrize("head_kernel, kept", [(1, 5), (3, 6)])
@torch.no_grad()
def test_residual_channel_goes_only_when_dead_in_every_producer(head_kernel, kept):
    model = _Residual(head_kernel).eval()
    _train_bn(model, torch.Generator().manual_seed(1))
    model.a.weight[[1, 4]] = 0  # 1: dead in both producers; 4: in one only
    model.b.weight[1] = 0
    model.bn_a.bias[1], model.bn_b.bias[1] = 3.0, 3.0  # a positive constant on the stream
    model.bn_a.running_mean[1] = model.bn_b.running_mean[1] = 0.0
    small, _ = _shrink(model, (3, 8, 8))
    assert small.get_submodule("head").weight.shape[1] == kept
    assert small.get_submodule("a").weight.shape[0] == kept
    _assert_same_outputs(model, small, (3, 8, 8))


class _Concat(nn.Module):
    """Two branches concatenated, BN → ReLU → 1×1 conv: ``(N, 3, H, W) → (N, 5, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


@torch.no_grad()
def test_concat_shifts_indices_and_folds_constants():
    model = _Concat().eval()
    _train_bn(model, torch.Generator().manual_seed(2))
    model.b.weight[[0, 5]] = 0  # concat channels 4 and 9: constants b.bias → BN → ReLU
    small, _ = _shrink(model, (3, 8, 8))
    assert small.get_submodule("b").weight.shape[0] == 4
    assert small.get_submodule("a").weight.shape[0] == 4
    assert small.get_submodule("bn").num_features == 8
    assert small.get_submodule("head").weight.shape[1] == 8
    _assert_same_outputs(model, small, (3, 8, 8))


def test_all_zero_layer_keeps_one_channel_with_a_warning():
    model = _masked("lenet300", trained=True)
    with torch.no_grad():
        model.body[3].weight.zero_()
    small, messages = _shrink(model, (1, 28, 28))
    assert small.get_submodule("body.3").weight.shape[0] == 1
    assert any("'body.3'" in m for m in messages)
    _assert_same_outputs(model, small, (1, 28, 28))


def test_round_to_rejects_bad_values():
    with pytest.raises(ValueError, match="round_to"):
        shrink(nn.Linear(2, 2), torch.zeros(1, 2), round_to=0)


def test_summary_counts_and_formats():
    model = _masked("lenet300", trained=False)
    x = torch.randn(4, 1, 28, 28)
    small, _ = _shrink(model, (1, 28, 28))
    report = summary(model, small, x, runs=3)
    assert set(report) == {"before", "after", "ratio"}
    for side, m in (("before", model), ("after", small)):
        row = report[side]
        assert row["params"] == _params(m)
        assert row["nonzero_params"] == sum(int(p.count_nonzero()) for p in m.parameters())
        linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
        assert row["macs"] == sum(mod.weight.numel() for mod in linears)
        assert row["file_bytes"] > 4 * row["params"]
        assert row["latency_ms"] > 0
    assert report["ratio"]["params"] == report["before"]["params"] / report["after"]["params"]
    table = format_summary(report)
    assert all(label in table for label in FIELDS.values())


class _Shared(nn.Module):
    """One conv called twice (shared weights): ``(N, 3, H, W) → (N, 4, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(torch.relu(self.conv(self.stem(x)))))


@torch.no_grad()
def test_shared_layer_and_unknown_ops_are_left_alone():
    model = _Shared().eval()
    model.stem.weight[2] = 0
    model.stem.bias[2] = 0
    model.conv.weight[[1, 3]] = 0
    small, _ = _shrink(model, (3, 8, 8))
    assert small.get_submodule("conv").weight.shape == (6, 6, 1, 1)  # shared: untouched
    assert small.get_submodule("stem").weight.shape == (6, 3, 3, 3)  # read by the shared conv
    _assert_same_outputs(model, small, (3, 8, 8))

    softmax = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1), nn.Linear(6, 2)).eval()
    softmax[0].weight[1] = 0  # its constant enters a softmax over the channels: kept
    small, _ = _shrink(softmax, (4,))
    assert small.get_submodule("0").weight.shape == (6, 4)
    _assert_same_outputs(softmax, small, (4,))
