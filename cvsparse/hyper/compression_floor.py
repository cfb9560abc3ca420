"""A compression floor on the learned λ1: the validation loss decides, down to a stated size.

The validation loss of docs/method.md §1 may prefer a network denser than the one a user needs (on
LeNet-5 it settles near 9x–35x, RESULTS.md).  With a floor, λ1 solves

    min_λ cv(λ)   subject to   log c ≥ log C(t)

where ``c`` is the compression rate (regularized weights / nonzero ones, docs/method.md §7) and
the floor ``C(t) = C^min(1, (t + 1) / R)`` grows geometrically over the first ``R`` epochs
(global epoch ``t``), so that pruning is spread over training instead of done at once.  The
constraint's multiplier ``ν ≥ 0`` follows dual ascent at every hyper step,

    ν ← max(0, ν + ρ · s · (log C(t) − log c)),        s = current lr / base lr,

and enters the λ1 step in log space (``d log c / d log λ1 > 0``; its scale is absorbed by the
gain ``ρ``): ``λ1 ← λ1 · exp(ν_new − ν_old)``, and while ``ν > 0`` (the floor binds) the
hypergradient may raise λ1 but not lower it.  Where the network is already above the floor,
``ν`` decays to 0 and λ1 is the validation loss's alone.  ``s`` lets the floor act, like λ1,
through ``lr · λ1``: at a decayed learning rate the proximal step hardly prunes, and an unscaled
``ν`` would wind up and prune everything at the next restart of the schedule.
"""

from __future__ import annotations

import math
from typing import Any


class CompressionFloor:
    """The multiplier ``ν`` of a compression floor (module docstring).

    Args:
        target: the floor ``C`` once the ramp is over (≥ 1, a compression rate).
        ramp_epochs: ``R`` ≥ 1, global epochs over which the floor grows from 1 to ``target``.
        gain: ``ρ`` > 0, the dual step per hyper step and unit of log shortfall.
    """

    def __init__(self, target: float, ramp_epochs: int, gain: float = 0.1) -> None:
        if not (isinstance(target, (int, float)) and 1 <= target < math.inf):
            raise ValueError(f"target must be a finite compression rate >= 1, got {target!r}")
        if isinstance(ramp_epochs, bool) or not isinstance(ramp_epochs, int) or ramp_epochs < 1:
            raise ValueError(f"ramp_epochs must be an int >= 1, got {ramp_epochs!r}")
        if not (isinstance(gain, (int, float)) and 0 < gain < math.inf):
            raise ValueError(f"gain must be a finite number > 0, got {gain!r}")
        self.target, self.ramp_epochs, self.gain = float(target), ramp_epochs, float(gain)
        self.nu = 0.0

    @property
    def binding(self) -> bool:
        """Whether the floor holds λ1 up (``ν > 0``)."""
        return self.nu > 0

    def level(self, epoch: float) -> float:
        """The floor ``C(t)`` during global epoch ``epoch`` (0-based; a fraction of an epoch
        gives a level between two epochs')."""
        return self.target ** min(1.0, (epoch + 1) / self.ramp_epochs)

    def update(self, compression: float, epoch: float, lr_scale: float) -> float:
        """One dual-ascent step at a hyper step of epoch ``epoch``, the network at
        ``compression`` and the weight lr at ``lr_scale`` times its base value.

        Returns:
            The factor ``exp(ν_new − ν_old)`` by which λ1 is to be multiplied.
        """
        if not (compression >= 1 and lr_scale >= 0):
            raise ValueError(f"need compression >= 1 and lr_scale >= 0, got {compression!r}, "
                             f"{lr_scale!r}")
        shortfall = math.log(self.level(epoch)) - math.log(compression)   # −inf: all pruned
        step = self.gain * lr_scale * shortfall if lr_scale > 0 else 0.0
        old, self.nu = self.nu, max(0.0, self.nu + step)
        return math.exp(self.nu - old)

    def state_dict(self) -> dict[str, Any]:
        return {"nu": self.nu}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        nu = float(state["nu"])
        if not 0 <= nu < math.inf:
            raise ValueError(f"state['nu'] must be finite and >= 0, got {nu!r}")
        self.nu = nu
