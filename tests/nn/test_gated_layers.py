"""AutoPrune's gated layers and the convert / strip model transformations (docs/method.md §6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cvsparse.models import MODELS
from cvsparse.nn import (
    GatedConv2d,
    GatedLinear,
    aux_parameters,
    convert,
    convertible_layers,
    gated_layers,
    strip,
)
from cvsparse.params import regularized_parameters

LAYERS = {
    "conv": (GatedConv2d, nn.Conv2d, dict(in_channels=3, out_channels=6, kernel_size=3,
                                           stride=2, padding=1), (2, 3, 7, 7)),
    "linear": (GatedLinear, nn.Linear, dict(in_features=5, out_features=4), (3, 5)),
}


def unit_mask(layer) -> torch.Tensor:
    """``aux > 0`` broadcast to the weight's shape, computed here from its definition."""
    m = layer.aux.detach()
    return (m.reshape(m.shape + (1,) * (layer.weight.dim() - m.dim())) > 0).expand_as(
        layer.weight
    )


def randomize_aux(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, aux in aux_parameters(model):
            aux.copy_(torch.randn(aux.shape, generator=gen))


# ---- the layers ------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_matches_plain_layer_with_masked_weight(kind, granularity):
    gated_cls, plain_cls, args, x_shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = gated_cls(**args, granularity=granularity)
    plain = plain_cls(**args)
    assert list(layer.state_dict()) == list(plain.state_dict()) + ["aux"]
    assert layer.weight.shape == plain.weight.shape
    assert layer.aux.shape == (layer.weight.shape if granularity == "weight"
                               else layer.weight.shape[:1])
    randomize_aux(layer)
    x = torch.randn(x_shape)
    masked = layer.weight.detach() * unit_mask(layer)
    want = (F.conv2d(x, masked, layer.bias, stride=2, padding=1) if kind == "conv"
            else F.linear(x, masked, layer.bias))
    assert torch.equal(layer(x), want)
    assert torch.equal(layer.effective_weight(), masked)
    assert torch.equal(layer.gate(), layer.aux > 0) and layer.gate().dtype == torch.bool


@pytest.mark.parametrize("update", ["proposed", "bnn"])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_gradients(kind, granularity, update):
    gated_cls, _, args, x_shape = LAYERS[kind]
    torch.manual_seed(1)
    layer = gated_cls(**args, granularity=granularity, ste="leaky_relu", slope=0.2, update=update)
    randomize_aux(layer, seed=1)
    x, mask = torch.randn(x_shape), unit_mask(layer)
    upstream = torch.randn_like(layer(x))
    (layer(x) * upstream).sum().backward()
    # ∂L/∂ŵ from a plain layer evaluated at ŵ, then docs/method.md §6 by hand.
    w_hat = (layer.weight.detach() * mask).requires_grad_()
    out = (F.conv2d(x, w_hat, layer.bias, stride=2, padding=1) if kind == "conv"
           else F.linear(x, w_hat, layer.bias))
    (out * upstream).sum().backward()
    g = w_hat.grad
    coef = torch.sign(layer.weight.detach()) if update == "proposed" else layer.weight.detach()
    per_weight = g * coef
    if granularity == "neuron":
        per_weight = per_weight.flatten(1).sum(dim=1)
    m = layer.aux.detach()
    ste_grad = torch.where(m > 0, torch.ones_like(m), torch.full_like(m, 0.2))
    torch.testing.assert_close(layer.weight.grad, g * mask)
    torch.testing.assert_close(layer.aux.grad, per_weight * ste_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("kind, channels_last",
                         [("conv", False), ("conv", True), ("linear", False)])
def test_fixed_gates_give_the_gated_op_bits(kind, channels_last, granularity, dtype):
    """Gates that take no gradient are a plain mask; oracle: the same layer through the gated
    op (its gates learning), whose output and weight gradient must be equal bit for bit, in
    training and under ``no_grad``, on contiguous and channels-last weights."""
    gated_cls, _, args, x_shape = LAYERS[kind]
    torch.manual_seed(2)
    learning = gated_cls(**args, granularity=granularity, dtype=dtype)
    randomize_aux(learning, seed=2)
    fixed = gated_cls(**args, granularity=granularity, dtype=dtype)
    fixed.load_state_dict(learning.state_dict())
    fixed.aux.requires_grad_(False)
    x = torch.randn(x_shape, dtype=dtype)
    if channels_last:
        learning, fixed = (m.to(memory_format=torch.channels_last) for m in (learning, fixed))
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn_like(learning(x))
    outs = []
    for layer in (learning, fixed):
        out = layer(x)
        (out * upstream).sum().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(learning.weight.grad, fixed.weight.grad)
    assert (learning.weight.grad[~unit_mask(learning)] == 0).all()
    assert fixed.aux.grad is None and learning.aux.grad is not None
    with torch.no_grad():
        assert torch.equal(learning(x), outs[0]) and torch.equal(fixed(x), outs[0])


@pytest.mark.parametrize("kind", LAYERS)
def test_neuron_gate_off_silences_output_unit(kind):
    gated_cls, _, args, x_shape = LAYERS[kind]
    layer = gated_cls(**args, granularity="neuron")
    with torch.no_grad():
        layer.aux.fill_(0.5)
        layer.aux[1] = -0.2
    out = layer(torch.randn(x_shape))
    out.sum().backward()
    unit_1 = out[:, 1]
    assert torch.equal(unit_1, layer.bias[1].detach().expand_as(unit_1))
    assert (out[:, 0] != layer.bias[0]).any()
    assert (layer.weight.grad[1] == 0).all() and (layer.weight.grad[0] != 0).any()
    assert layer.aux.grad[1] != 0  # the straight-through estimate keeps it trainable


def test_aux_init_distribution_and_reset():
    layer = GatedLinear(200, 150)
    aux = layer.aux.detach()
    n = aux.numel()
    assert abs(aux.mean().item() - 0.1) < 5 * 0.05 / n**0.5
    assert abs(aux.std().item() - 0.05) < 5 * 0.05 / (2 * n) ** 0.5
    fixed = GatedConv2d(2, 3, 1, granularity="neuron", aux_init=(-0.4, 0.0))
    assert torch.equal(fixed.aux.detach(), torch.full((3,), -0.4))
    with torch.no_grad():
        fixed.aux.zero_()
    fixed.reset_parameters()
    assert torch.equal(fixed.aux.detach(), torch.full((3,), -0.4))


def test_dtype_device_kwargs_reach_aux():
    layer = GatedConv2d(2, 3, 3, dtype=torch.float64, granularity="neuron")
    assert layer.aux.dtype == torch.float64 and layer.aux.shape == (3,)
    half = GatedLinear(4, 2, dtype=torch.bfloat16)
    assert half.aux.dtype == torch.bfloat16
    assert half(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_extra_repr_names_the_options():
    text = repr(GatedLinear(3, 2, granularity="neuron", ste="leaky_relu", slope=0.3,
                            update="bnn"))
    for part in ("in_features=3", "granularity=neuron", "ste=leaky_relu", "slope=0.3",
                 "update=bnn"):
        assert part in text


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(granularity="channel"), "granularity"),
        (dict(ste="relu"), "ste"),
        (dict(slope=-0.1), "slope"),
        (dict(slope=float("nan")), "slope"),
        (dict(update="sgd"), "update"),
        (dict(aux_init=(0.1,)), "aux_init"),
        (dict(aux_init=(0.1, -0.05)), "aux_init"),
    ],
)
@pytest.mark.parametrize("cls", [GatedConv2d, GatedLinear])
def test_bad_options_raise_value_error(cls, kwargs, name):
    args = (3, 2, 3) if cls is GatedConv2d else (3, 2)
    with pytest.raises(ValueError, match=name):
        cls(*args, **kwargs)
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=name):
        convert(model, **kwargs)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_torch_compile_matches_eager(granularity):
    torch.manual_seed(2)
    eager = GatedLinear(6, 5, granularity=granularity, ste="softplus", update="bnn")
    randomize_aux(eager, seed=2)
    compiled = GatedLinear(6, 5, granularity=granularity, ste="softplus", update="bnn")
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(4, 6)

    def loss(layer: nn.Module) -> torch.Tensor:
        return layer(x).square().sum()

    want = loss(eager)
    want.backward()
    got = torch.compile(loss, fullgraph=True)(compiled)
    got.backward()
    torch.testing.assert_close(got, want)
    for name, param in eager.named_parameters():
        torch.testing.assert_close(dict(compiled.named_parameters())[name].grad, param.grad,
                                   msg=name)


# ---- convert / strip -------------------------------------------------------------------------

def small_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.Flatten(),
        nn.Linear(6 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 5),
    )


def test_convert_swaps_layers_and_keeps_parameters():
    model = small_net()
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    want = model.eval()(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert convert(model, granularity="neuron", aux_init=(1.0, 0.1)) is model
    assert [type(model[i]) for i in (0, 3, 5, 7)] == [GatedConv2d, GatedConv2d, GatedLinear,
                                                      GatedLinear]
    assert type(model[1]) is nn.BatchNorm2d
    for name, param in before.items():
        assert model.get_parameter(name) is param, name
    assert [n for n, _ in gated_layers(model)] == ["0", "3", "5", "7"]
    assert [n for n, _ in aux_parameters(model)] == ["0.aux", "3.aux", "5.aux", "7.aux"]
    assert sorted(model.state_dict()) == sorted(keys + ["0.aux", "3.aux", "5.aux", "7.aux"])
    assert not model.training  # the mode of each layer is carried over
    assert torch.equal(model(x), want)  # every gate is on (aux ~ N(1, 0.1²))
    # An optimizer built before convert still updates the model's weights.
    model(x).sum().backward()
    old = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(model[0].weight.detach(), old)
    assert len(regularized_parameters(model)) == 4


def test_convert_selected_layers():
    model = convert(small_net(), layers=["3", "7"], ste="softplus")
    assert type(model[0]) is nn.Conv2d
    assert [n for n, _ in gated_layers(model)] == ["3", "7"]
    assert model[7].ste == "softplus" and type(model[5]) is nn.Linear


def test_convertible_layers_are_what_convert_swaps_by_default():
    model = small_net()
    names = convertible_layers(model)
    assert names == [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert [n for n, _ in gated_layers(convert(model))] == names


@pytest.mark.parametrize("layers", [["0", "nope"], ["1"], ["4"]])
def test_convert_rejects_unknown_layers_without_changes(layers):
    model = small_net()
    modules = list(model)
    with pytest.raises(ValueError, match="layers"):
        convert(model, layers=layers)
    assert list(model) == modules and not gated_layers(model)


def test_convert_shared_and_root_and_subclassed_layers():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    convert(model)
    assert model[0] is model[2] and isinstance(model[0], GatedLinear)
    assert model[0].weight is shared.weight
    root = nn.Linear(3, 2)
    gated = convert(root, granularity="neuron")
    assert isinstance(gated, GatedLinear) and gated.weight is root.weight
    assert type(strip(gated)) is nn.Linear
    attention = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass: left alone
    convert(attention)
    assert not gated_layers(attention)


def test_convert_follows_dtype():
    model = convert(small_net().double())
    assert all(p.dtype == torch.float64 for _, p in aux_parameters(model))
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_strip_gives_identical_eval_outputs(granularity):
    model = small_net()
    keys = list(model.state_dict())
    convert(model, granularity=granularity)
    randomize_aux(model, seed=4)
    masks = {name: unit_mask(layer) for name, layer in gated_layers(model)}
    biases = {name: layer.bias for name, layer in gated_layers(model)}
    weights = {name: layer.weight.detach().clone() for name, layer in gated_layers(model)}
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    want = model(x)
    assert strip(model) is model
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), want)
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        assert type(layer) in (nn.Conv2d, nn.Linear)
        assert torch.equal(layer.weight.detach(), weights[name] * mask)
        assert layer.bias is biases[name]
    assert not aux_parameters(model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_strip_model_zoo(name):
    torch.manual_seed(5)
    model = MODELS[name]().eval()
    keys = list(model.state_dict())
    n_layers = len(regularized_parameters(model))
    shape = (1, 28, 28) if name.startswith("lenet") else (3, 32, 32)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        convert(model, granularity="neuron" if name.startswith("resnet") else "weight")
        assert len(gated_layers(model)) == n_layers
        randomize_aux(model, seed=5)
        want = model(x)
        strip(model)
        assert list(model.state_dict()) == keys
        assert torch.equal(model(x), want)
