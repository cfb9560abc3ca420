"""CompressionFloor: the ramp, dual ascent on its multiplier, state round trip, rejected input;
and LambdaOptimizer.rescale_lambda1_, through which the multiplier acts."""

from __future__ import annotations

import math

import pytest
import torch

from cvsparse.hyper import CompressionFloor, LambdaOptimizer


def test_ramp_grows_geometrically_to_the_target_and_stays():
    floor = CompressionFloor(100.0, ramp_epochs=4)
    levels = [floor.level(t) for t in range(7)]
    assert levels[3:] == [100.0] * 4                      # reached at the ramp's last epoch
    ratios = [b / a for a, b in zip(levels[:3], levels[1:4], strict=True)]
    assert ratios == pytest.approx([levels[0]] * 3)        # one factor per epoch, from 1
    assert levels[0] ** 4 == pytest.approx(100.0)


def test_multiplier_integrates_the_log_shortfall_scaled_by_the_lr():
    """Oracle: ν written out by hand as the clipped running sum of ρ·s·(log C − log c); the
    returned factors multiply to exp(ν) (λ1 ends at its start times exp(ν))."""
    floor = CompressionFloor(8.0, ramp_epochs=1, gain=0.1)
    steps = [(2.0, 1.0), (4.0, 0.5), (16.0, 1.0), (64.0, 1.0), (1.0, 0.0), (2.0, 0.01)]
    nu, product = 0.0, 1.0
    for compression, lr_scale in steps:
        factor = floor.update(compression, epoch=0, lr_scale=lr_scale)
        expected = max(0.0, nu + 0.1 * lr_scale * (math.log(8.0) - math.log(compression)))
        assert factor == pytest.approx(math.exp(expected - nu))
        nu, product = expected, product * factor
        assert floor.nu == pytest.approx(nu) and floor.binding == (nu > 0)
    assert product == pytest.approx(math.exp(floor.nu))
    assert floor.nu > 0     # the last step, below the floor, raised it again


def test_above_the_floor_nothing_moves_and_everything_pruned_releases_it():
    floor = CompressionFloor(10.0, ramp_epochs=1)
    assert floor.update(50.0, epoch=3, lr_scale=1.0) == 1.0 and not floor.binding
    floor.update(2.0, epoch=3, lr_scale=1.0)
    assert floor.binding
    nu = floor.nu   # all pruned: the shortfall is −∞, ν is clipped to 0 and λ1 loses exp(ν)
    assert floor.update(math.inf, epoch=3, lr_scale=1.0) == math.exp(-nu) and floor.nu == 0.0


def test_state_round_trip_and_rejected_state():
    floor = CompressionFloor(10.0, ramp_epochs=2)
    floor.update(1.5, epoch=0, lr_scale=1.0)
    copy = CompressionFloor(10.0, ramp_epochs=2)
    copy.load_state_dict(floor.state_dict())
    assert copy.nu == floor.nu > 0
    with pytest.raises(ValueError, match="nu"):
        copy.load_state_dict({"nu": -1.0})
    assert copy.nu == floor.nu


@pytest.mark.parametrize("args, message", [
    ((0.5, 3), "target"), ((math.inf, 3), "target"), ((10.0, 0), "ramp_epochs"),
    ((10.0, 2.5), "ramp_epochs"), ((10.0, 3, 0.0), "gain"), ((10.0, 3, math.nan), "gain"),
])
def test_bad_arguments_are_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        CompressionFloor(*args)


def test_bad_update_is_rejected_and_changes_nothing():
    floor = CompressionFloor(10.0, ramp_epochs=1)
    floor.update(2.0, epoch=0, lr_scale=1.0)
    nu = floor.nu
    for compression, lr_scale in [(0.5, 1.0), (math.nan, 1.0), (2.0, -1.0)]:
        with pytest.raises(ValueError):
            floor.update(compression, epoch=0, lr_scale=lr_scale)
    assert floor.nu == nu


def test_rescale_lambda1_holds_then_multiplies_and_leaves_the_moments():
    """Oracle: an optimizer that took the same step; rescaling touches λ1 only (max with
    ``at_least``, times the factor, within the bounds), not λ2 nor Adam's moments."""
    def stepped():
        opt = LambdaOptimizer(torch.tensor([1e-3, 4e-3]), 1e-4, lr=0.1, log_space=True,
                              lambda1_bounds=(0.0, 1e-2))
        opt.step(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5]))
        return opt

    reference, opt = stepped(), stepped()
    at_least = torch.tensor([2e-3, 1e-3], dtype=torch.float64)
    opt.rescale_lambda1_(3.0, at_least)
    expected = torch.maximum(reference.lambda1, at_least) * 3.0
    torch.testing.assert_close(opt.lambda1, expected.clamp(max=1e-2))
    assert float(opt.lambda1[1]) == 1e-2                    # the upper bound holds
    assert torch.equal(opt.lambda2, reference.lambda2)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(torch.as_tensor(opt.state_dict()[key]),
                           torch.as_tensor(reference.state_dict()[key]))
    with pytest.raises(ValueError, match="factor"):
        opt.rescale_lambda1_(0.0)
