"""FLOPs, per-layer table, totals and evaluation against hand formulas and direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvsparse.batches import BatchLoader
from cvsparse.metrics import count_flops, evaluate, layer_table, summarize
from cvsparse.models import build_model, input_shape
from cvsparse.params import regularized_parameters


def test_conv_flops_hand_formula():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    (f,) = count_flops(conv, (3, 15, 15))
    h_out = (15 + 2 * 1 - 3) // 2 + 1  # 8
    assert f.positions == h_out * h_out
    assert f.flops_dense == f.flops_effective == 2 * (8 * 3 * 3 * 3) * h_out * h_out
    assert f.kind == "conv" and f.weight_shape == (8, 3, 3, 3)


def test_grouped_conv_and_linear_hand_formula():
    conv = nn.Conv2d(4, 6, kernel_size=3, groups=2)
    (f,) = count_flops(conv, (4, 7, 7))
    assert f.flops_dense == 2 * (6 * 2 * 3 * 3) * 5 * 5  # each output reads Cin/groups channels
    (f,) = count_flops(nn.Linear(20, 7), (20,))
    assert f.flops_dense == 2 * 20 * 7 and f.positions == 1 and f.kind == "linear"


def test_effective_flops_after_zeroing_half_the_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1)
    with torch.no_grad():
        flat = conv.weight.view(-1)
        flat[torch.randperm(flat.numel())[: flat.numel() // 2]] = 0
    (f,) = count_flops(conv, (4, 5, 5))
    assert f.flops_effective * 2 == f.flops_dense
    assert f.nonzero_live == conv.weight.numel() // 2


def test_units_zero_counts_a_zeroed_output_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4))
    with torch.no_grad():
        model[0].weight[2] = 0
        model[3].weight[1, 7] = 0  # a single weight: no unit is zero
    rows = layer_table(model, (3, 6, 6))
    assert [r["name"] for r in rows] == [n for n, _ in regularized_parameters(model)]
    conv, fc = rows
    assert conv["units_total"] == 5 and conv["units_zero"] == 1
    assert conv["params"] == 135 and conv["nonzero"] == 135 - 27
    assert conv["pruned_pct"] == pytest.approx(100 * 27 / 135)
    assert conv["compression_rate"] == pytest.approx(135 / 108)
    assert fc["units_zero"] == 0 and fc["nonzero"] == 80 * 4 - 1
    # the conv bias keeps channel 2 alive (ReLU(bias) is a constant, not zero): fc is not helped
    assert fc["flops_effective"] == 2 * (80 * 4 - 1)


def chain(bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(2, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(),
               nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2)]
    return nn.Sequential(*layers)


def kill_unit(layer: nn.Module, unit: int) -> None:
    with torch.no_grad():
        layer.weight[unit] = 0
        layer.bias[unit] = 0


def live_nonzeros(weight: torch.Tensor, dead: list[int]) -> int:
    keep = [i for i in range(weight.shape[1]) if i not in dead]
    return int((weight[:, keep] != 0).sum())


@pytest.mark.parametrize("bn", [False, True])
def test_dead_channels_propagate_through_a_sequential_chain(bn):
    torch.manual_seed(0)
    model = chain(bn)
    convs_and_fcs = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    conv1, conv2, fc1, fc2 = convs_and_fcs
    kill_unit(conv1, 1)
    kill_unit(conv2, 2)
    kill_unit(fc1, 3)
    # oracle 1: the channels claimed dead really are zero on random inputs
    acts = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args: acts.__setitem__(mod, args[0].clone()))
        for m in (conv2, fc1, fc2)
    ]
    model.eval()
    with torch.no_grad():
        model(torch.randn(16, 2, 8, 8))
    for h in handles:
        h.remove()
    assert acts[conv2][:, 1].abs().sum() == 0
    assert acts[fc1].view(16, 3, 16)[:, 2].abs().sum() == 0
    assert acts[fc2][:, 3].abs().sum() == 0
    # oracle 2: effective FLOPs count only nonzero weights on live inputs
    model.train()
    flops = {f.name: f for f in count_flops(model, (2, 8, 8))}
    assert model.training and all(m.training for m in model.modules())  # modes restored
    by_layer = dict(zip(convs_and_fcs, flops.values(), strict=True))
    assert by_layer[conv1].dead_inputs == 0
    assert by_layer[conv2].dead_inputs == 1
    assert by_layer[conv2].flops_effective == 2 * live_nonzeros(conv2.weight, [1]) * 4 * 4
    assert by_layer[fc1].dead_inputs == 16
    assert by_layer[fc1].flops_effective == 2 * live_nonzeros(fc1.weight, list(range(32, 48)))
    assert by_layer[fc2].flops_effective == 2 * live_nonzeros(fc2.weight, [3])


def test_channel_with_nonzero_bias_or_bn_offset_is_not_dead():
    torch.manual_seed(0)
    model = chain(bn=True)
    conv1, bn = model[0], model[1]
    kill_unit(conv1, 1)
    with torch.no_grad():
        bn.bias[1] = 0.5  # BN maps the zero channel to 0.5: live
    conv2 = model[4]
    flops = {f.name: f for f in count_flops(model, (2, 8, 8))}
    assert flops["4"].dead_inputs == 0
    assert flops["4"].flops_effective == 2 * int((conv2.weight != 0).sum()) * 16


def test_residual_blocks_only_discount_zero_weights():
    torch.manual_seed(0)
    model = build_model("resnet20")
    with torch.no_grad():
        model.layer1[0].conv1.weight[3] = 0
    flops = {f.name: f for f in count_flops(model, (3, 32, 32))}
    assert all(f.dead_inputs == 0 for f in flops.values())
    f = flops["layer1.0.conv1"]
    assert f.flops_effective == f.flops_dense * 15 // 16


def test_count_flops_leaves_model_state_alone():
    torch.manual_seed(0)
    model = build_model("vgg16")
    model.train()
    model.features[1].eval()  # a per-module mode must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    count_flops(model, (3, 32, 32))
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and not model.features[1].training and model.features[4].training


# Published dense cost in multiply-accumulates (Li et al. 2017, "Pruning Filters for Efficient
# ConvNets", Table 1): VGG-16 3.13e8, ResNet-56 1.25e8, ResNet-110 2.53e8.  FLOPs = 2 · MACs.
@pytest.mark.parametrize(("name", "macs"), [("vgg16", 3.13e8), ("resnet56", 1.25e8),
                                            ("resnet110", 2.53e8)])
def test_model_flops_match_published(name, macs):
    totals = summarize(layer_table(build_model(name), input_shape(name)))
    # the table gives three significant digits: the count rounds to it (half a unit, 0.005e8)
    assert totals["flops_dense"] / 2 == pytest.approx(macs, abs=0.005e8)


def test_summarize_totals():
    torch.manual_seed(0)
    model = build_model("lenet5")
    with torch.no_grad():
        model.body[5].weight[:100] = 0
    rows = layer_table(model, (1, 28, 28))
    totals = summarize(rows, model)
    assert totals["params_total"] == sum(p.numel() for _, p in regularized_parameters(model))
    assert totals["params_all"] == 431_080
    assert totals["params_nonzero"] == totals["params_total"] - 100 * 800
    assert totals["compression_rate"] == pytest.approx(totals["params_total"]
                                                       / totals["params_nonzero"])
    assert totals["pruned_pct"] == pytest.approx(100 * 80_000 / totals["params_total"])
    assert totals["units_total"] == 20 + 50 + 500 + 10 and totals["units_zero"] == 100
    for key in ("flops_dense", "flops_effective"):
        assert totals[key] == sum(r[key] for r in rows)
    assert summarize(rows)["params_all"] is None


def test_fully_pruned_tensor_has_infinite_compression():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
    (row,) = layer_table(model, (3,))
    assert row["compression_rate"] == math.inf and row["pruned_pct"] == 100.0
    assert summarize([row])["compression_rate"] == math.inf


def test_evaluate_matches_direct_computation():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (70, 1, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 3, (70,))
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 3))
    loader = BatchLoader(images, labels, torch.arange(70), 32, shuffle=False, augment=False,
                         mean=(0.5,), std=(0.25,))
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        logits = model[2](x.flatten(1))  # dropout off: what eval mode must give
    model.train()
    result = evaluate(model, loader)
    assert model.training and model[1].training
    assert result["n"] == 70
    # float32 sums of at most 32 positive cross-entropies per batch (then float64) against one
    # float32 mean of all 70: at most (32 + 70)·2⁻²⁴ ≈ 6e-6 apart, relative (no cancellation)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, [])


def test_bad_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        count_flops(nn.Linear(3, 2), (0,))
