"""Models for the export tests: the zoo with "trained" BatchNorm, a magnitude-pruned LeNet-300,
and a custom module whose class a fresh process cannot import."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvsparse.models import build_model


def trained_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics (as after training), so a
    channel's constant after BN and every BN term of the output are exercised; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def magnitude_prune(model: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    """Zero the smallest ``sparsity`` fraction of every Conv/Linear weight (as -0.0, which
    proximal steps also produce); random nonzero biases; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                keep = max(1, round(w.numel() * (1 - sparsity)))
                cut = w.abs().flatten().kthvalue(w.numel() - keep).values
                w[w.abs() <= cut] = -0.0
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


class Custom(nn.Module):
    """Exercises the graph whitelist beyond the zoo: a free parameter and buffer (get_attr),
    slicing, ``size``/``view`` methods, ``torch.cat``, functional ops, a two-tensor output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.register_buffer("shift", torch.linspace(-0.2, 0.2, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.relu(self.bn(self.conv(x))) * self.scale
        y = torch.cat([y[:, :4], y[:, 4:] - 1.0], dim=1)
        y = F.adaptive_avg_pool2d(y, (1, 2))
        feats = y.view(y.size(0), -1) + self.shift
        return self.fc(feats), torch.sigmoid(feats)


def zoo_model(name: str, seed: int = 0) -> nn.Module:
    """Model ``name`` of the zoo, seeded, with trained BN, in eval mode."""
    torch.manual_seed(seed)
    return trained_bn(build_model(name), seed)


def kill_inner_channels(model: nn.Module, fraction: float, seed: int = 0) -> nn.Module:
    """Zero the weights of a random ``fraction`` of the output channels of every residual
    block's first convolution (``conv1`` inside a block), so that ``shrink`` removes them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and name.endswith(".conv1"):
                dead = torch.randperm(m.out_channels, generator=g)[:int(m.out_channels
                                                                        * fraction)]
                m.weight[dead] = 0.0
    return model


def sparse_lenet300(sparsity: float = 0.98, seed: int = 0) -> nn.Module:
    """A magnitude-pruned LeNet-300 whose Linear layers are ``cvsparse.nn.SparseLinear`` (the
    first two with their ReLU fused), as ``sparsify`` leaves it; eval mode."""
    from cvsparse.nn import SparseLinear

    torch.manual_seed(seed)
    body = magnitude_prune(build_model("lenet300"), sparsity, seed).body
    return nn.Sequential(body[0], SparseLinear.from_dense(body[1], relu=True),
                         SparseLinear.from_dense(body[3], relu=True),
                         SparseLinear.from_dense(body[5])).eval()


def sparse_lenet5(sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    """A magnitude-pruned LeNet-5 with ``SparseConv2d`` convolutions (the first with its max
    pool fused, as ``sparsify`` leaves it; the second followed by its own pool) and a
    ``SparseLinear`` first fully connected layer; eval mode."""
    from cvsparse.nn import SparseConv2d, SparseLinear

    torch.manual_seed(seed)
    body = magnitude_prune(build_model("lenet5"), sparsity, seed).body
    return nn.Sequential(SparseConv2d.from_dense(body[0], pool=2), nn.Identity(),
                         SparseConv2d.from_dense(body[2]), body[3], body[4],
                         SparseLinear.from_dense(body[5], relu=True), body[7]).eval()
