"""Hypergradient estimators against independent oracles.

The central check: on an elastic-net logistic regression (convex) solved to machine precision,
``cg`` run to convergence equals a central finite difference of the validation loss between
problems re-solved at λ ± ε.  The inner solver is NumPy FISTA followed by Newton steps on the
support, certified by the gradient mapping and the strict KKT margin off the support.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cvsparse.hyper import hypergradient

N_FEATURES = 10
GROUPS = (slice(0, 5), slice(5, 10))  # the weight vector is held as two tensors of 5
EPS = 1e-5


# ---- the convex problem: elastic-net logistic regression, solved in NumPy ------------------

class ElasticNetLogistic:
    """200 samples × 10 features, disjoint halves for training and validation."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((200, N_FEATURES))
        w_true = np.array([2.0, -1.5, 1.0, 0.0, 0.0, 0.5, -0.5, 0.0, 0.0, 0.8])
        y = (rng.random(200) < 1 / (1 + np.exp(-x @ w_true))).astype(float)
        self.xt, self.yt, self.xv, self.yv = x[:100], y[:100], x[100:], y[100:]

    @staticmethod
    def loss(w, x, y) -> float:
        z = x @ w
        return float(np.mean(np.logaddexp(0, z) - y * z))

    @staticmethod
    def grad(w, x, y):
        return x.T @ (1 / (1 + np.exp(-x @ w)) - y) / len(y)

    def hessian(self, w):
        s = 1 / (1 + np.exp(-self.xt @ w))
        return (self.xt.T * (s * (1 - s))) @ self.xt / len(self.yt)

    def solve(self, lambda1, lambda2):
        """Minimizer of CE_train + Σ λ1_l‖w_l‖₁ + Σ λ2_l/2‖w_l‖², with its certificates."""
        l1, l2 = _expand(lambda1), _expand(lambda2)
        step = 1 / (np.linalg.norm(self.xt, 2) ** 2 / (4 * len(self.yt)) + l2.max())
        w = np.zeros(N_FEATURES)
        y, t = w.copy(), 1.0
        for _ in range(3000):  # FISTA
            w_next = _soft(y - step * (self.grad(y, self.xt, self.yt) + l2 * y), step * l1)
            t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
            y = w_next + (t - 1) / t_next * (w_next - w)
            w, t = w_next, t_next
        free = w != 0
        for _ in range(10):  # Newton on the support (signs fixed) to machine precision
            g = self.grad(w, self.xt, self.yt) + l2 * w + l1 * np.sign(w)
            h = self.hessian(w)[np.ix_(free, free)] + np.diag(l2[free])
            w[free] -= np.linalg.solve(h, g[free])
        mapping = w - _soft(w - step * (self.grad(w, self.xt, self.yt) + l2 * w), step * l1)
        margin = (l1 - np.abs(self.grad(w, self.xt, self.yt)))[~free]
        return w, np.linalg.norm(mapping) / step, margin

    def torch_problem(self, w):
        """Two leaf tensors holding ``w`` and the train / validation loss closures."""
        params = [torch.tensor(w[g], requires_grad=True) for g in GROUPS]
        xt, yt, xv, yv = (torch.tensor(a) for a in (self.xt, self.yt, self.xv, self.yv))

        def loss(x, y):
            return nn.functional.binary_cross_entropy_with_logits(x @ torch.cat(params), y)

        return params, (lambda: loss(xt, yt)), (lambda: loss(xv, yv))


def _expand(lam):
    values = np.broadcast_to(np.asarray(lam, dtype=float), (len(GROUPS),))
    out = np.empty(N_FEATURES)
    for g, v in zip(GROUPS, values, strict=True):
        out[g] = v
    return out


def _numpy(lam):
    return lam.numpy() if isinstance(lam, torch.Tensor) else np.asarray(lam, dtype=float)


def _soft(z, t):
    return np.sign(z) * np.maximum(np.abs(z) - t, 0)


@pytest.fixture(scope="module")
def logistic():
    return ElasticNetLogistic()


def _estimate(problem, w, lambda1, lambda2, estimator, **opts):
    params, train_loss, val_loss = problem.torch_problem(w)
    return hypergradient(params, lambda1, lambda2, train_loss, val_loss, estimator, **opts)


CG_EXACT = {"iters": 100, "tol": 1e-14, "damping": 0.0}
LAMBDAS = {  # (λ1, λ2): global floats, and one pair per tensor
    "global": (0.03, 0.1),
    "per_tensor": (torch.tensor([0.03, 0.05], dtype=torch.float64),
                   torch.tensor([0.1, 0.2], dtype=torch.float64)),
}


def _finite_difference(problem, lambda1, lambda2, which, index, support):
    """Central difference of cv w.r.t. component ``index`` of λ``which`` (all of it if the λ
    is a float), re-solving the problem at both ends and checking the support is unchanged."""
    values = []
    for sign in (1, -1):
        lam = [_numpy(lambda1).copy(), _numpy(lambda2).copy()]
        if lam[which].ndim == 0:
            lam[which] = lam[which] + sign * EPS
        else:
            lam[which][index] += sign * EPS
        w, mapping, margin = problem.solve(*lam)
        assert mapping < 1e-10 and (margin > 1e-3).all()
        assert np.array_equal(w != 0, support), "the support changed within ±ε"
        values.append(problem.loss(w, problem.xv, problem.yv))
    return (values[0] - values[1]) / (2 * EPS)


@pytest.mark.parametrize("kind", LAMBDAS)
def test_cg_matches_finite_difference_of_resolved_problems(logistic, kind):
    lambda1, lambda2 = LAMBDAS[kind]
    w, mapping, margin = logistic.solve(_numpy(lambda1), _numpy(lambda2))
    assert mapping < 1e-10 and (margin > 1e-3).all()
    support = w != 0
    assert 0 < support.sum() < N_FEATURES  # the free set is a proper subset
    d1, d2 = _estimate(logistic, w, lambda1, lambda2, "cg", **CG_EXACT)
    estimates = [d1.reshape(-1), d2.reshape(-1)]
    errors = []
    for which, estimate in enumerate(estimates):
        assert estimate.dtype == torch.float64
        for index in range(estimate.numel()):
            fd = _finite_difference(logistic, lambda1, lambda2, which, index, support)
            assert abs(fd) > 1e-3  # a meaningful derivative, not a vanishing one
            errors.append(abs(float(estimate[index]) - fd) / abs(fd))
    print(f"{kind}: relative errors of cg vs finite differences: "
          + ", ".join(f"{e:.2e}" for e in errors))
    assert max(errors) < 1e-4


def test_cg_equals_closed_form_on_free_set(logistic):
    """−s_Fᵀ H_FF⁻¹ ∇cv_F (NumPy): zero weights must not enter the solve."""
    w, _, _ = logistic.solve(0.03, 0.1)
    free = w != 0
    h = logistic.hessian(w)[np.ix_(free, free)] + 0.1 * np.eye(free.sum())
    p = np.linalg.solve(h, logistic.grad(w, logistic.xv, logistic.yv)[free])
    expected = (-p @ np.sign(w[free]), -p @ w[free])
    d1, d2 = _estimate(logistic, w, 0.03, 0.1, "cg", **CG_EXACT)
    np.testing.assert_allclose([float(d1), float(d2)], expected, rtol=1e-10)


def test_identity_agrees_in_sign(logistic):
    w, _, _ = logistic.solve(0.03, 0.1)
    exact = _estimate(logistic, w, 0.03, 0.1, "cg", **CG_EXACT)
    rough = _estimate(logistic, w, 0.03, 0.1, "identity")
    for a, b in zip(exact, rough, strict=True):
        assert torch.sign(a) == torch.sign(b) != 0


def test_neumann_converges_to_cg(logistic):
    lambda1, lambda2 = LAMBDAS["per_tensor"]
    w, _, _ = logistic.solve(_numpy(lambda1), _numpy(lambda2))
    exact = torch.cat(_estimate(logistic, w, lambda1, lambda2, "cg", **CG_EXACT))
    alpha = 1 / (np.linalg.eigvalsh(logistic.hessian(w)).max() + 0.2)  # < 2/λ_max(H)
    errors = []
    for iters in (2, 10, 50, 200):
        approx = torch.cat(_estimate(logistic, w, lambda1, lambda2, "neumann", iters=iters,
                                     alpha=alpha))
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-6


def test_diagonal_exact_uses_the_hessian_diagonal(logistic):
    """``p_i = ∇cv_i / (H_ii + λ2 + δ)`` with the analytic logistic Hessian diagonal."""
    w, _, _ = logistic.solve(0.03, 0.1)
    free = w != 0
    damping = 1e-2
    p = logistic.grad(w, logistic.xv, logistic.yv) / (np.diag(logistic.hessian(w)) + 0.1
                                                        + damping)
    expected = (-(p * np.sign(w))[free].sum(), -(p * w)[free].sum())
    d1, d2 = _estimate(logistic, w, 0.03, 0.1, "diagonal", curvature="exact", damping=damping)
    np.testing.assert_allclose([float(d1), float(d2)], expected, rtol=1e-10)


# ---- a problem whose Hessian is diagonal: separable quadratic data loss --------------------

def _separable_problem():
    """Data loss Σ a_i (w_i − b_i)²/2 over two tensors with some zero weights."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (6,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params[0][0, :2] = 0
    params[1][3] = 0
    params = [p.requires_grad_() for p in params]
    a = [torch.rand(s, generator=gen, dtype=torch.float64) * 3 + 0.5 for s in shapes]
    b = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    c = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    def train_loss():
        return sum((ai * (p - bi) ** 2).sum() / 2 for p, ai, bi in zip(params, a, b, strict=True))

    def val_loss():
        return sum(((p - ci) ** 2).sum() + (p ** 3).sum() / 3 for p, ci in
                   zip(params, c, strict=True))

    return params, train_loss, val_loss, a, b, c


LAMBDA2 = torch.tensor([0.3, 0.05], dtype=torch.float64)


@pytest.mark.parametrize("curvature", ["exact", "hutchinson"])
def test_diagonal_equals_cg_when_the_hessian_is_diagonal(curvature):
    """Exact diagonal curvature is the whole Hessian here; Hutchinson too (z_i² = 1)."""
    params, train_loss, val_loss, *_ = _separable_problem()
    lambda1 = torch.tensor([0.01, 0.02], dtype=torch.float64)
    damping = 1e-3
    solved = hypergradient(params, lambda1, LAMBDA2, train_loss, val_loss, "cg", iters=50,
                           tol=1e-14, damping=damping)
    diag = hypergradient(params, lambda1, LAMBDA2, train_loss, val_loss, "diagonal",
                         curvature=curvature, samples=2, damping=damping)
    for x, y in zip(solved, diag, strict=True):
        assert x.shape == (2,)
        torch.testing.assert_close(x, y, rtol=1e-10, atol=0)


def test_diagonal_fisher_uses_squared_training_gradient():
    params, train_loss, val_loss, a, b, c = _separable_problem()
    lambda1 = torch.tensor([0.01, 0.02], dtype=torch.float64)
    damping = 1e-3
    d1, d2 = hypergradient(params, lambda1, LAMBDA2, train_loss, val_loss, "diagonal",
                           curvature="fisher", damping=damping)
    with torch.no_grad():
        q = [(2 * (p - ci) + p ** 2) / ((ai * (p - bi)) ** 2 + lam + damping) * (p != 0)
             for p, ai, bi, ci, lam in zip(params, a, b, c, LAMBDA2.tolist(), strict=True)]
        e1 = torch.stack([-(qi * torch.sign(p)).sum() for qi, p in zip(q, params, strict=True)])
        e2 = torch.stack([-(qi * p).sum() for qi, p in zip(q, params, strict=True)])
    torch.testing.assert_close(d1, e1, rtol=1e-10, atol=0)
    torch.testing.assert_close(d2, e2, rtol=1e-10, atol=0)


# ---- every estimator on a small MLP --------------------------------------------------------

def _mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:, :2] = 0  # some pruned weights
    params = [model[0].weight, model[2].weight]
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    xv, yv = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def train_loss():
        return nn.functional.cross_entropy(model(x), y)

    def val_loss():
        return nn.functional.cross_entropy(model(xv), yv)

    return model, params, train_loss, val_loss


ESTIMATOR_OPTS = [
    ("identity", {}),
    ("diagonal", {"curvature": "hutchinson", "samples": 3}),
    ("diagonal", {"curvature": "fisher"}),
    ("diagonal", {"curvature": "exact"}),
    ("neumann", {"iters": 5, "alpha": 0.1}),
    ("cg", {"iters": 5}),
]
LAMBDA_FORMS = {
    "float": (1e-3, 1e-2, ()),
    "global_tensor": (torch.tensor([1e-3]), torch.tensor([1e-2]), (1,)),
    "per_tensor": (torch.tensor([1e-3, 2e-3]), torch.tensor([1e-2, 0.0]), (2,)),
}


@pytest.mark.parametrize("form", LAMBDA_FORMS)
@pytest.mark.parametrize(("estimator", "opts"), ESTIMATOR_OPTS)
def test_estimators_on_mlp_are_finite_and_shaped_like_lambda(estimator, opts, form):
    model, params, train_loss, val_loss = _mlp_problem()
    lambda1, lambda2, shape = LAMBDA_FORMS[form]
    before = [p.detach().clone() for p in model.parameters()]
    d1, d2 = hypergradient(params, lambda1, lambda2, train_loss, val_loss, estimator, **opts)
    for d in (d1, d2):
        assert d.shape == shape and torch.isfinite(d).all()
        assert d.dtype == (torch.float64 if form == "float" else torch.float32)
    assert float(d1.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_global_result_is_the_sum_of_per_tensor_results():
    _, params, train_loss, val_loss = _mlp_problem()
    per = hypergradient(params, torch.zeros(2), torch.full((2,), 1e-2), train_loss, val_loss,
                        "cg", iters=4)
    total = hypergradient(params, 0.0, 1e-2, train_loss, val_loss, "cg", iters=4)
    for a, b in zip(per, total, strict=True):
        torch.testing.assert_close(a.sum().double(), b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("args", "opts", "match"), [
    ({"estimator": "newton"}, {}, "unknown estimator"),
    ({"estimator": "cg"}, {"iters": -1}, "iters"),
    ({"estimator": "neumann"}, {"alpha": 0.0}, "alpha"),
    ({"estimator": "cg"}, {"samples": 2}, "no option 'samples'"),
    ({"estimator": "diagonal"}, {"curvature": "bogus"}, "curvature"),
    ({"estimator": "diagonal"}, {"damping": 0.0}, "damping"),
    ({"lambda1": -1.0}, {}, "lambda1"),
    ({"lambda2": torch.ones(3)}, {}, "lambda2"),
    ({"val_loss": lambda: torch.ones(2, requires_grad=True)}, {}, "val_loss"),
])
def test_bad_arguments_raise_value_error(args, opts, match):
    _, params, train_loss, val_loss = _mlp_problem()
    kwargs = {"lambda1": 1e-3, "lambda2": 0.0, "train_loss": train_loss, "val_loss": val_loss,
              "estimator": "identity", **args}
    with pytest.raises(ValueError, match=match):
        hypergradient(params, **kwargs, **opts)
