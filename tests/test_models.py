"""Model zoo: sizes against the published numbers and closed-form counts, shapes, init, API."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cvsparse.models import MODELS, build_model, input_shape
from cvsparse.models.resnet_cifar import BasicBlock, PadShortcut, ResNetCifar


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def resnet_count(depth: int, classes: int) -> int:
    """Closed form for He et al.'s CIFAR ResNet with option-A shortcuts (no projection convs)."""
    n = (depth - 2) // 6
    total = conv(3, 16, 3) + 2 * 16  # stem conv + BN
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, width, 3) + conv(width, width, 3) + 2 * (2 * width)
            cin = width
    return total + 64 * classes + classes


def densenet40_count(classes: int) -> int:
    """Closed form for DenseNet-40 (k = 12, 3 × 12 BN-ReLU-conv3×3 layers, 1×1 transitions)."""
    channels, total = 16, conv(3, 16, 3)
    for block in range(3):
        for _ in range(12):
            total += 2 * channels + conv(channels, 12, 3)
            channels += 12
        if block < 2:
            total += 2 * channels + conv(channels, channels, 1)
    return total + 2 * channels + channels * classes + classes


def vgg16_count(classes: int) -> int:
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    total, cin = 0, 3
    for w in widths:
        total += conv(cin, w, 3) + 2 * w
        cin = w
    return total + 512 * 512 + 512 + 512 * classes + classes


# Published sizes: LeNets from Han et al. 2015 (Caffe models, exact); VGG-16 (CIFAR, BN, two fc)
# 1.5e7 from Li et al. 2017 Table 1; ResNets from He et al. 2016 Table 6; DenseNet-40 (k=12)
# 1.0M from Huang et al. 2017 Table 2.  The published CIFAR figures are rounded.
PUBLISHED = {
    "lenet300": (266_610, 0.0),
    "lenet5": (431_080, 0.0),
    "vgg16": (15.0e6, 0.01),
    "resnet20": (0.27e6, 0.01),
    "resnet32": (0.46e6, 0.01),
    "resnet56": (0.85e6, 0.01),
    "resnet110": (1.7e6, 0.02),
    "densenet40": (1.0e6, 0.02),
}

CLOSED_FORM = {
    "lenet300": lambda c: 784 * 300 + 300 + 300 * 100 + 100 + 100 * c + c,
    "lenet5": lambda c: conv(1, 20, 5) + 20 + conv(20, 50, 5) + 50 + 800 * 500 + 500 + 500 * c + c,
    "vgg16": vgg16_count,
    "resnet20": lambda c: resnet_count(20, c),
    "resnet32": lambda c: resnet_count(32, c),
    "resnet56": lambda c: resnet_count(56, c),
    "resnet110": lambda c: resnet_count(110, c),
    "densenet40": densenet40_count,
}


def test_registry_has_every_model():
    assert set(MODELS) == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_published(name):
    published, rel = PUBLISHED[name]
    count = n_params(build_model(name))
    assert count == pytest.approx(published, rel=rel, abs=0)


@pytest.mark.parametrize("name", list(CLOSED_FORM))
@pytest.mark.parametrize("classes", [10, 100])
def test_parameter_count_matches_closed_form(name, classes):
    assert n_params(build_model(name, num_classes=classes)) == CLOSED_FORM[name](classes)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("classes", [10, 100])
def test_output_shape(name, classes):
    model = build_model(name, num_classes=classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *input_shape(name)))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "convs", "linears"),
    [("lenet300", 0, 3), ("lenet5", 2, 2), ("vgg16", 13, 2), ("resnet20", 19, 1),
     ("resnet56", 55, 1), ("resnet110", 109, 1), ("densenet40", 39, 1)],
)
def test_weighted_layer_counts(name, convs, linears):
    """Depth in the papers' sense: weighted layers; option A means no projection convs."""
    modules = list(build_model(name).modules())
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == convs
    assert sum(isinstance(m, nn.Linear) for m in modules) == linears


@pytest.mark.parametrize("name", list(MODELS))
def test_deterministic_given_seed(name):
    torch.manual_seed(3)
    a = build_model(name).state_dict()
    torch.manual_seed(3)
    b = build_model(name).state_dict()
    torch.manual_seed(4)
    c = build_model(name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _assert_normal_sample(w: torch.Tensor, sigma: float) -> None:
    """``w`` looks like ``n`` draws from N(0, σ²): its mean within 5 standard errors (σ/√n) of
    0, its sample std within 5 standard errors (σ/√(2n), the large-n std of a normal sample's
    std) of σ.  A wrong fan or gain moves the std by far more (fan 300 instead of 784: +62%)."""
    n = w.numel()
    assert abs(w.mean().item()) < 5 * sigma / math.sqrt(n)
    assert abs(w.std().item() - sigma) < 5 * sigma / math.sqrt(2 * n)


def test_he_init_scale():
    torch.manual_seed(0)
    resnet = build_model("resnet56")
    _assert_normal_sample(resnet.layer3[4].conv1.weight, math.sqrt(2 / 576))  # 64×64×3×3,
    lenet = build_model("lenet300")                                      # fan-out 64·9 = 576
    _assert_normal_sample(lenet.body[1].weight, math.sqrt(2 / 784))      # 300×784, fan-in 784
    assert all(m.bias.abs().sum() == 0 for m in lenet.modules() if isinstance(m, nn.Linear))


def test_each_residual_block_starts_as_its_shortcut():
    """Zero-init residual: at init every block computes relu(shortcut(x)), in training and in
    eval mode, so the network's output is the stem, the shortcuts and the classifier alone."""
    torch.manual_seed(0)
    resnet = build_model("resnet56")
    blocks = [m for m in resnet.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 27
    x = torch.randn(4, 16, 16, 16)
    for block in (resnet.layer1[0], resnet.layer2[0]):
        for train in (True, False):
            block.train(train)
            torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))
        x = block(x)
    plain = ResNetCifar(56, zero_init_residual=False)
    assert all(m.bn2.weight.eq(1).all() for m in plain.modules() if isinstance(m, BasicBlock))
    # by default only the deep ResNets start as their shortcuts (ResNet-20 trains better without)
    for name, zero in (("resnet20", False), ("resnet56", True), ("resnet110", True)):
        bn2 = [m.bn2.weight for m in build_model(name).modules() if isinstance(m, BasicBlock)]
        assert all(w.eq(0 if zero else 1).all() for w in bn2), name


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_densenet_dropout_only_in_training():
    torch.manual_seed(0)
    model = build_model("densenet40")
    dropped = MODELS["densenet40"](drop_rate=0.2)
    dropped.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 8, 8)  # globally pooled: small inputs keep this fast
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), dropped.eval()(x))
        dropped.train()
        assert not torch.allclose(dropped(x), dropped(x))


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resnet56.*densenet40|densenet40.*resnet56"):
        build_model("resnet57")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet5", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("lenet5", in_channels=0)


def test_input_shape():
    assert input_shape("lenet5", "mnist") == (1, 28, 28)
    assert input_shape("lenet300") == (1, 28, 28)
    assert input_shape("vgg16", "cifar100") == (3, 32, 32)
    assert input_shape("resnet20") == (3, 32, 32)
    with pytest.raises(ValueError, match="32x32"):
        input_shape("vgg16", "mnist")
    with pytest.raises(ValueError, match="28x28"):
        input_shape("lenet300", "cifar10")
    with pytest.raises(ValueError, match="dataset"):
        input_shape("lenet5", "svhn")
    # globally pooled models take MNIST with one input channel
    shape = input_shape("resnet20", "mnist")
    model = build_model("resnet20", in_channels=shape[0]).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)
