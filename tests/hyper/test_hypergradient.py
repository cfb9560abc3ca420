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
    """200 samples × 10 features, disjoint halves for training and validation.

    With ``bias=True`` the model has an unpenalized intercept and the features are uncentred
    (shifted by ``offset``), so the intercept is coupled to the weights: the hypergradient is
    right only if the intercept joins the curvature system.
    """

    def __init__(self, seed: int = 0, *, bias: bool = False, offset: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((200, N_FEATURES)) + (offset if bias else 0.0)
        w_true = np.array([2.0, -1.5, 1.0, 0.0, 0.0, 0.5, -0.5, 0.0, 0.0, 0.8])
        b_true = -1.0 if bias else 0.0
        z = (x - (offset if bias else 0.0)) @ w_true + b_true
        y = (rng.random(200) < 1 / (1 + np.exp(-z))).astype(float)
        self.bias = bias
        if bias:  # a column of ones carries the intercept (the last coordinate, unpenalized)
            x = np.hstack([x, np.ones((200, 1))])
        self.xt, self.yt, self.xv, self.yv = x[:100], y[:100], x[100:], y[100:]
        self.dim = x.shape[1]

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

    def penalties(self, lambda1, lambda2):
        """Per-coordinate λ1, λ2 (zero on the intercept)."""
        l1, l2 = np.zeros(self.dim), np.zeros(self.dim)
        l1[:N_FEATURES], l2[:N_FEATURES] = _expand(lambda1), _expand(lambda2)
        return l1, l2

    def solve(self, lambda1, lambda2):
        """Minimizer of CE_train + Σ λ1_l‖w_l‖₁ + Σ λ2_l/2‖w_l‖² (intercept unpenalized),
        with its certificates: the norm of the gradient mapping and the KKT margin off the
        support."""
        l1, l2 = self.penalties(lambda1, lambda2)
        step = 1 / (np.linalg.norm(self.xt, 2) ** 2 / (4 * len(self.yt)) + l2.max())
        w = np.zeros(self.dim)
        y, t = w.copy(), 1.0
        for _ in range(5000):  # FISTA
            w_next = _soft(y - step * (self.grad(y, self.xt, self.yt) + l2 * y), step * l1)
            t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
            y = w_next + (t - 1) / t_next * (w_next - w)
            w, t = w_next, t_next
        free = (w != 0) | (l1 == 0)
        for _ in range(10):  # Newton on the support (signs fixed) to machine precision
            g = self.grad(w, self.xt, self.yt) + l2 * w + l1 * np.sign(w)
            h = self.hessian(w)[np.ix_(free, free)] + np.diag(l2[free])
            w[free] -= np.linalg.solve(h, g[free])
        mapping = w - _soft(w - step * (self.grad(w, self.xt, self.yt) + l2 * w), step * l1)
        margin = (l1 - np.abs(self.grad(w, self.xt, self.yt)))[~free]
        return w, np.linalg.norm(mapping) / step, margin

    def closed_form(self, w, lambda2, *, hold_intercept: bool = False):
        """``−[sign(w), w]ᵀ H_FF⁻¹ ∇cv_F`` per tensor (NumPy), F the nonzero weights plus the
        intercept; with ``hold_intercept`` the intercept is left out of the system (the error
        the ``unregularized`` argument exists to avoid)."""
        _, l2 = self.penalties(0.0, lambda2)
        free = w != 0
        if self.bias:
            free[-1] = not hold_intercept
        h = self.hessian(w)[np.ix_(free, free)] + np.diag(l2[free])
        p = np.zeros(self.dim)
        p[free] = np.linalg.solve(h, self.grad(w, self.xv, self.yv)[free])
        return [np.array([-(p[g] * np.sign(w[g])).sum() for g in GROUPS]),
                np.array([-(p[g] * w[g]).sum() for g in GROUPS])]

    def torch_problem(self, w):
        """Two leaf tensors holding the weights, the intercept tensors (empty without a bias)
        and the train / validation loss closures."""
        params = [torch.tensor(w[g], requires_grad=True) for g in GROUPS]
        intercept = [torch.tensor(w[N_FEATURES:], requires_grad=True)] if self.bias else []
        xt, yt, xv, yv = (torch.tensor(a) for a in (self.xt, self.yt, self.xv, self.yv))

        def loss(x, y):
            return nn.functional.binary_cross_entropy_with_logits(
                x @ torch.cat(params + intercept), y)

        return params, intercept, (lambda: loss(xt, yt)), (lambda: loss(xv, yv))


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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems have tens of parameters: thousands of tiny products (Neumann terms,
    L-BFGS steps) run fastest on one thread, and a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def logistic():
    return ElasticNetLogistic()


@pytest.fixture(scope="module")
def logistic_bias():
    return ElasticNetLogistic(bias=True, offset=1.5)


def _estimate(problem, w, lambda1, lambda2, estimator, *, hold_intercept=False, **opts):
    params, intercept, train_loss, val_loss = problem.torch_problem(w)
    return hypergradient(params, lambda1, lambda2, train_loss, val_loss, estimator=estimator,
                         unregularized=() if hold_intercept else intercept, **opts)


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


def _relative_errors_to_finite_differences(problem, kind, **estimate_opts):
    lambda1, lambda2 = LAMBDAS[kind]
    w, mapping, margin = problem.solve(_numpy(lambda1), _numpy(lambda2))
    assert mapping < 1e-10 and (margin > 1e-3).all()
    support = w != 0
    assert 0 < support[:N_FEATURES].sum() < N_FEATURES  # the free set is a proper subset
    d1, d2 = _estimate(problem, w, lambda1, lambda2, "cg", **CG_EXACT, **estimate_opts)
    errors = []
    for which, estimate in enumerate([d1.reshape(-1), d2.reshape(-1)]):
        assert estimate.dtype == torch.float64
        for index in range(estimate.numel()):
            fd = _finite_difference(problem, lambda1, lambda2, which, index, support)
            assert abs(fd) > 1e-3  # a meaningful derivative, not a vanishing one
            errors.append(abs(float(estimate[index]) - fd) / abs(fd))
    return errors


# The central difference of re-solved problems has a truncation error of order ε²·|cv‴|
# (≈ 1e-10) and a rounding error of order 1e-16/ε (≈ 1e-11) against derivatives of order
# 0.1–1, and the solver is certified to a gradient mapping < 1e-10: 1e-4 leaves a wide margin
# while any modelling error (a missing block of H) shows up at the percent level.
FD_RTOL = 1e-4


@pytest.mark.parametrize("kind", LAMBDAS)
def test_cg_matches_finite_difference_of_resolved_problems(logistic, kind):
    errors = _relative_errors_to_finite_differences(logistic, kind)
    assert max(errors) < FD_RTOL, errors


@pytest.mark.parametrize("kind", LAMBDAS)
def test_cg_with_an_unpenalized_intercept_matches_finite_difference(logistic_bias, kind):
    """Uncentred features couple the intercept to the weights: with the intercept in
    ``unregularized`` the solve uses the Schur complement and matches re-solved problems."""
    errors = _relative_errors_to_finite_differences(logistic_bias, kind)
    assert max(errors) < FD_RTOL, errors


def test_holding_the_intercept_fixed_is_measurably_wrong(logistic_bias):
    """The same problem with the intercept left out of the system (H_WW instead of its Schur
    complement) is off by orders of magnitude more than the finite-difference tolerance (8% and
    15% here): the test above can tell the two apart."""
    errors = _relative_errors_to_finite_differences(logistic_bias, "global",
                                                    hold_intercept=True)
    print("intercept held fixed: relative errors " + ", ".join(f"{e:.3f}" for e in errors))
    assert min(errors) > 100 * FD_RTOL, errors


@pytest.mark.parametrize("bias", [False, True])
def test_cg_equals_closed_form_on_free_set(bias):
    """−s_Fᵀ H_FF⁻¹ ∇cv_F (NumPy): zero weights must not enter the solve; the intercept does."""
    problem = ElasticNetLogistic(bias=bias, offset=1.5)
    lambda1, lambda2 = LAMBDAS["per_tensor"]
    w, _, _ = problem.solve(_numpy(lambda1), _numpy(lambda2))
    expected = problem.closed_form(w, _numpy(lambda2))
    d1, d2 = _estimate(problem, w, lambda1, lambda2, "cg", **CG_EXACT)
    np.testing.assert_allclose(d1.numpy(), expected[0], rtol=1e-10)
    np.testing.assert_allclose(d2.numpy(), expected[1], rtol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_identity_agrees_in_sign(bias):
    problem = ElasticNetLogistic(bias=bias, offset=1.5)
    w, _, _ = problem.solve(0.03, 0.1)
    exact = problem.closed_form(w, 0.1)
    rough = _estimate(problem, w, 0.03, 0.1, "identity")
    for a, b in zip(exact, rough, strict=True):
        assert np.sign(a.sum()) == torch.sign(b) != 0


def test_neumann_converges_to_cg(logistic_bias):
    lambda1, lambda2 = LAMBDAS["per_tensor"]
    w, _, _ = logistic_bias.solve(_numpy(lambda1), _numpy(lambda2))
    exact = torch.cat(_estimate(logistic_bias, w, lambda1, lambda2, "cg", **CG_EXACT))
    alpha = 1 / (np.linalg.eigvalsh(logistic_bias.hessian(w)).max() + 0.2)  # < 2/λ_max(H)
    errors = []
    # The intercept on uncentred features makes H ill-conditioned (κ ≈ 190 on F): the error
    # contracts by 1 − α·λ_min ≈ 0.995 per term, so 1e-6 needs about 2,700 terms.
    for iters in (10, 100, 1000, 4000):
        approx = torch.cat(_estimate(logistic_bias, w, lambda1, lambda2, "neumann",
                                     iters=iters, alpha=alpha))
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-6


def test_diagonal_exact_uses_the_hessian_diagonal(logistic_bias):
    """``p_i = ∇cv_i / (H_ii + λ2 + δ)`` with the analytic logistic Hessian diagonal; the
    intercept plays no part (the diagonal estimator ignores coupling)."""
    w, _, _ = logistic_bias.solve(0.03, 0.1)
    free = (w != 0)[:N_FEATURES]
    damping = 1e-2
    h = np.diag(logistic_bias.hessian(w))[:N_FEATURES]
    p = logistic_bias.grad(w, logistic_bias.xv, logistic_bias.yv)[:N_FEATURES] / (
        h + 0.1 + damping)
    wr = w[:N_FEATURES]
    expected = (-(p * np.sign(wr))[free].sum(), -(p * wr)[free].sum())
    for hold in (False, True):
        d1, d2 = _estimate(logistic_bias, w, 0.03, 0.1, "diagonal", curvature="exact",
                           damping=damping, hold_intercept=hold)
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
    solved = hypergradient(params, lambda1, LAMBDA2, train_loss, val_loss, estimator="cg",
                           iters=50, tol=1e-14, damping=damping)
    diag = hypergradient(params, lambda1, LAMBDA2, train_loss, val_loss, estimator="diagonal",
                         curvature=curvature, samples=2, damping=damping)
    for x, y in zip(solved, diag, strict=True):
        assert x.shape == (2,)
        torch.testing.assert_close(x, y, rtol=1e-10, atol=0)


def test_fisher_is_the_mean_of_squared_minibatch_gradients():
    """Least squares on three mini-batches: the Fisher curvature is
    ``mean_b (X_bᵀ(X_b w − y_b)/B)²``, computed here in NumPy from the normal equations."""
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((8, 6)), rng.standard_normal(8)) for _ in range(3)]
    xv, yv = rng.standard_normal((10, 6)), rng.standard_normal(10)
    w = rng.standard_normal(6)
    w[[1, 4]] = 0
    lambda2, damping = 0.05, 1e-3
    grads = [x.T @ (x @ w - y) / len(y) for x, y in batches]
    fisher = np.mean([g * g for g in grads], axis=0)
    grad_cv = xv.T @ (xv @ w - yv) / len(yv)
    p = np.where(w != 0, grad_cv / (fisher + lambda2 + damping), 0.0)
    expected = (-(p * np.sign(w)).sum(), -(p * w).sum())

    param = torch.tensor(w, requires_grad=True)
    drawn = iter(batches)

    def train_loss():  # each call draws the next mini-batch, as a loader would
        x, y = (torch.tensor(a) for a in next(drawn))
        return ((x @ param - y) ** 2).mean() / 2

    def val_loss():
        return ((torch.tensor(xv) @ param - torch.tensor(yv)) ** 2).mean() / 2

    report = {}
    d1, d2 = hypergradient([param], 0.0, lambda2, train_loss, val_loss, estimator="diagonal",
                           curvature="fisher", samples=3, damping=damping, diagnostics=report)
    np.testing.assert_allclose([float(d1), float(d2)], expected, rtol=1e-12)
    assert report["clipped"] == 0  # a square is never negative


# ---- exact implicit differentiation with the full Hessian (float64) -------------------------

# The output layers have no bias: softmax is invariant to adding one constant to every logit,
# so an output bias makes H singular along (1, …, 1), and a convolution bias before BatchNorm
# duplicates BN's shift; either would leave the exact system without a unique solution.

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, 3, bias=False)).double()


def _cnn():
    """Conv → BatchNorm (eval mode, "trained" statistics) → tanh → Linear.

    BN's shift β is trained; its scale γ is frozen at random values: an unregularized scale in
    front of an L2-regularized layer lets the fit trade weight norm for scale without bound
    (tanh saturates instead of the loss rising), so training would have no stationary point.
    """
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                          nn.Tanh(), nn.Flatten(), nn.Linear(75, 2, bias=False)).double()
    with torch.no_grad():
        bn = model[1]
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    bn.weight.requires_grad_(False)
    return model.eval()


IFT_MODELS = {  # factory, input shape, classes, λ1 (enough to prune some weights, not all)
    "mlp_with_biases": (_mlp, (4,), 3, 2e-3),
    "cnn_with_batchnorm": (_cnn, (1, 5, 5), 2, 2e-3),
}
IFT_LAMBDA2 = 0.02
IFT_STEPS = 300
LBFGS_ITERS = 500


def _trained_ift_problem(name):
    """A small model trained to near-stationarity on ``CE + λ1‖W‖₁ + λ2/2‖W‖²`` by full-batch
    proximal gradient (float64), with its data and the split of its parameters."""
    make, shape, classes, lambda1 = IFT_MODELS[name]
    model = make()
    gen = torch.Generator().manual_seed(2)
    xt = torch.randn(48, *shape, generator=gen, dtype=torch.float64) + 0.5  # uncentred
    xv = torch.randn(32, *shape, generator=gen, dtype=torch.float64) + 0.5
    teacher = torch.randn(int(np.prod(shape)), classes, generator=gen, dtype=torch.float64)
    yt, yv = (((x.flatten(1) - 0.5) @ teacher).argmax(1) for x in (xt, xv))  # a fit to learn
    noisy = torch.rand(48, generator=gen) < 0.25  # label noise: the classes overlap, so
    yt = torch.where(noisy, torch.randint(0, classes, (48,), generator=gen), yt)  # a finite fit
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    others = [p for p in model.parameters()
              if p.requires_grad and all(p is not w for w in weights)]
    lr = 0.3
    for _ in range(IFT_STEPS):  # proximal gradient: finds the support
        model.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        with torch.no_grad():
            for w in weights:
                z = w - lr * (w.grad + IFT_LAMBDA2 * w)
                w.copy_(z.sign() * (z.abs() - lr * lambda1).clamp(min=0))
            for u in others:
                u -= lr * u.grad
    # L-BFGS on that support (the L1 term is linear there) to a stationary point
    signs = [w.detach().sign() for w in weights]
    lbfgs = torch.optim.LBFGS(weights + others, lr=1, max_iter=LBFGS_ITERS, tolerance_grad=1e-12,
                              tolerance_change=1e-15, history_size=50,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt) + sum(
            lambda1 * (s * w).sum() + IFT_LAMBDA2 / 2 * w.square().sum()
            for s, w in zip(signs, weights, strict=True))
        loss.backward()
        for s, w in zip(signs, weights, strict=True):
            w.grad.mul_(s != 0)  # pruned weights stay at zero
        return loss

    lbfgs.step(closure)
    model.zero_grad(set_to_none=True)
    return model, weights, others, (xt, yt), (xv, yv)


def _exact_ift(model, weights, others, train, val, solve=torch.linalg.solve):
    """``dcv/dλ`` per tensor from the full Hessian over every parameter
    (``torch.autograd.functional.hessian`` of a functional call), restricted to
    F = {w ≠ 0} ∪ unregularized, and ``p_F = solve(H_FF, ∇cv_F)`` (a dense solve by
    default), with the eigenvalues of ``H_FF``."""
    names = dict((id(p), n) for n, p in model.named_parameters())
    order = weights + others
    sizes = [p.numel() for p in order]
    flat = torch.cat([p.detach().reshape(-1) for p in order])

    def unflatten(vector):
        parts = torch.split(vector, sizes)
        return {names[id(p)]: t.reshape(p.shape) for p, t in zip(order, parts, strict=True)}

    def objective(vector):
        tensors = unflatten(vector)
        out = torch.func.functional_call(model, tensors, (train[0],))
        ridge = sum(IFT_LAMBDA2 / 2 * tensors[names[id(w)]].square().sum() for w in weights)
        return nn.functional.cross_entropy(out, train[1]) + ridge

    def validation(vector):
        out = torch.func.functional_call(model, unflatten(vector), (val[0],))
        return nn.functional.cross_entropy(out, val[1])

    hessian = torch.autograd.functional.hessian(objective, flat)
    grad_cv = torch.autograd.functional.jacobian(validation, flat)
    n_weights = sum(sizes[:len(weights)])
    free = torch.cat([flat[:n_weights] != 0, torch.ones(len(flat) - n_weights, dtype=bool)])
    h_ff = hessian[free][:, free]
    p = torch.zeros_like(flat)
    p[free] = solve(h_ff, grad_cv[free])
    rows = []
    for part, w in zip(torch.split(p[:n_weights], sizes[:len(weights)]), weights, strict=True):
        w = w.detach().reshape(-1)
        rows.append((-(part * w.sign()).sum(), -(part * w).sum()))
    eigenvalues = torch.linalg.eigvalsh(h_ff)
    return torch.tensor(rows, dtype=flat.dtype), eigenvalues


@pytest.fixture(scope="module", params=list(IFT_MODELS))
def ift_problem(request):
    model, weights, others, train, val = _trained_ift_problem(request.param)
    exact, eigenvalues = _exact_ift(model, weights, others, train, val)
    assert eigenvalues.min() > 0, "the trained point must be a strict local minimum on F"
    assert any(bool((w == 0).any()) for w in weights), "L1 must have pruned some weights"

    def train_loss():
        return nn.functional.cross_entropy(model(train[0]), train[1])

    def val_loss():
        return nn.functional.cross_entropy(model(val[0]), val[1])

    return {"model": model, "weights": weights, "others": others, "exact": exact,
            "setup": (model, weights, others, train, val),
            "eigenvalues": eigenvalues, "train_loss": train_loss, "val_loss": val_loss}


def _ift_estimate(problem, estimator, *, unregularized=True, **opts):
    n = len(problem["weights"])
    d1, d2 = hypergradient(problem["weights"], torch.zeros(n, dtype=torch.float64),
                           torch.full((n,), IFT_LAMBDA2, dtype=torch.float64),
                           problem["train_loss"], problem["val_loss"], estimator=estimator,
                           unregularized=problem["others"] if unregularized else (), **opts)
    return torch.stack([d1, d2], dim=1)


def _relative_error(estimate, exact):
    return float((estimate - exact).norm() / exact.norm())


def test_cg_matches_exact_implicit_differentiation(ift_problem):
    estimate = _ift_estimate(ift_problem, "cg", iters=500, tol=1e-15, damping=0.0)
    assert _relative_error(estimate, ift_problem["exact"]) < 1e-6


def _neumann_series(alpha, iters):
    """The dense truncated series ``α Σ_{k=0..K} (I − αH)^k g``."""
    def solve(h, g):
        term, total = g.clone(), g.clone()
        for _ in range(iters):
            term = term - alpha * (h @ term)
            total = total + term
        return alpha * total
    return solve


def test_neumann_is_the_truncated_series_of_the_full_hessian(ift_problem):
    alpha = float(1 / ift_problem["eigenvalues"].max())
    expected, _ = _exact_ift(*ift_problem["setup"], solve=_neumann_series(alpha, 30))
    estimate = _ift_estimate(ift_problem, "neumann", iters=30, alpha=alpha)
    assert _relative_error(estimate, expected) < 1e-10


@pytest.mark.parametrize("ift_problem", ["cnn_with_batchnorm"], indirect=True)
def test_neumann_converges_to_exact_implicit_differentiation(ift_problem):
    """With α = 1.9/λ_max the error contracts at least by 1 − 1.9·λ_min/λ_max per term, so
    the K terms for 1e-4 follow from the spectrum.  On the CNN (κ ≈ 10³) that is a few
    thousand HVPs; the MLP's biases make its H ten times worse conditioned, too slow for a
    unit test (the truncated-series test above covers it exactly)."""
    eigenvalues = ift_problem["eigenvalues"]
    assert float(eigenvalues.max() / eigenvalues.min()) < 2_000
    alpha = float(1.9 / eigenvalues.max())
    iters = int(np.ceil(np.log(1e-4) / np.log1p(-float(eigenvalues.min() * alpha))))
    estimate = _ift_estimate(ift_problem, "neumann", iters=iters, alpha=alpha)
    assert _relative_error(estimate, ift_problem["exact"]) < 1e-3


def test_unregularized_tensors_change_the_solution(ift_problem):
    """Leaving biases and BN parameters out of the system is a different (wrong) answer."""
    held = _ift_estimate(ift_problem, "cg", unregularized=False, iters=500, tol=1e-15,
                         damping=0.0)
    assert _relative_error(held, ift_problem["exact"]) > 1e-3


def test_identity_and_diagonal_agree_in_sign_for_a_global_lambda(ift_problem):
    """The cheap estimators ignore the curvature's coupling (their error is documented in
    docs/method.md §3); what a λ step needs from them is the sign of the global derivative."""
    exact = ift_problem["exact"].sum(0)
    for estimator, opts in (("identity", {}), ("diagonal", {"curvature": "exact"})):
        rough = _ift_estimate(ift_problem, estimator, **opts).sum(0)
        assert torch.equal(torch.sign(rough), torch.sign(exact)), (estimator, rough, exact)


# ---- diagnostics: what the estimators had to approximate ------------------------------------

def _quadratic(curvatures, rhs):
    """Train loss ``Σ a_i w_i²/2`` (Hessian diag(a), possibly indefinite) and a validation
    loss whose gradient at ``w`` is ``rhs``."""
    w = torch.ones(len(curvatures), dtype=torch.float64, requires_grad=True)
    a = torch.tensor(curvatures, dtype=torch.float64)
    c = torch.tensor(rhs, dtype=torch.float64)
    return w, (lambda: (a * w * w).sum() / 2), (lambda: (c * w).sum())


def test_cg_falls_back_to_identity_on_negative_curvature_and_says_so():
    w, train_loss, val_loss = _quadratic([-1.0, -2.0], [1.0, 0.5])
    report = {}
    with pytest.warns(RuntimeWarning, match="identity"):
        d1, d2 = hypergradient([w], 0.0, 0.0, train_loss, val_loss, estimator="cg",
                               damping=0.0, diagnostics=report)
    assert report["fallback"] == "identity" and not report["converged"]
    rough = hypergradient([w], 0.0, 0.0, train_loss, val_loss, estimator="identity")
    assert (float(d1), float(d2)) == (float(rough[0]), float(rough[1])) == (-1.5, -1.5)


def test_cg_stops_at_the_last_iterate_on_later_negative_curvature():
    """H = diag(1, −0.5), ∇cv = (1, 0.1): the first direction has curvature 0.995 > 0, the
    second is negative; the result is the first CG iterate ``(rᵀr / rᵀHr)·r``."""
    w, train_loss, val_loss = _quadratic([1.0, -0.5], [1.0, 0.1])
    report = {}
    with pytest.warns(RuntimeWarning, match="step 2"):
        d1, _ = hypergradient([w], 0.0, 0.0, train_loss, val_loss, estimator="cg",
                              damping=0.0, diagnostics=report)
    r = np.array([1.0, 0.1])
    first = (r @ r) / (r @ (np.array([1.0, -0.5]) * r)) * r
    assert report["fallback"] == "partial" and report["iterations"] == 1
    assert float(d1) == pytest.approx(-first.sum(), rel=1e-12)


def test_cg_reports_convergence():
    w, train_loss, val_loss = _quadratic([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    report = {}
    hypergradient([w], 0.0, 0.0, train_loss, val_loss, estimator="cg", damping=0.0,
                  tol=1e-12, diagnostics=report)
    # CG on a 3×3 diagonal system with distinct eigenvalues converges in exactly 3 steps
    assert report == {"estimator": "cg", "free": 3, "iterations": 3, "converged": True,
                      "fallback": "none", "relative_residual": pytest.approx(0, abs=1e-12)}


def test_hutchinson_counts_clipped_negative_curvature():
    """A concave training loss has a negative Hessian diagonal, so every free weight's
    estimate is clipped (z_i·(Hz)_i = a_i exactly for a diagonal H)."""
    w, train_loss, val_loss = _quadratic([-1.0, 2.0, -3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    report = {}
    hypergradient([w], 0.0, 0.1, train_loss, val_loss, estimator="diagonal",
                  curvature="hutchinson", samples=2, diagnostics=report)
    assert report["clipped"] == 2 and report["free"] == 4


def test_free_set_counts_unregularized_tensors():
    model, params, train_loss, val_loss = _mlp_problem()
    others = [model[0].bias, model[2].bias]
    report = {}
    hypergradient(params, 1e-3, 1e-2, train_loss, val_loss, estimator="neumann", iters=3,
                  unregularized=others, diagnostics=report)
    nonzero = sum(int((p != 0).sum()) for p in params)
    assert report == {"estimator": "neumann", "free": nonzero + 8 + 3, "iterations": 3}


# ---- λ forms, purity and arguments on a small MLP -------------------------------------------

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
    "float": (1e-3, 1e-2),
    "global_tensor": (torch.tensor([1e-3]), torch.tensor([1e-2])),
}


@pytest.mark.filterwarnings("ignore:cg. non-positive curvature")  # an untrained MLP
@pytest.mark.parametrize("form", LAMBDA_FORMS)
@pytest.mark.parametrize(("estimator", "opts"), ESTIMATOR_OPTS)
def test_a_global_lambda_gets_the_sum_of_the_per_tensor_results(estimator, opts, form):
    """Same estimate, one λ for all tensors or one per tensor: the global derivative is the
    sum of the per-tensor ones (the chain rule through λ_l = λ); shapes and dtypes follow λ;
    parameters and ``.grad`` are left as they were."""
    model, params, train_loss, val_loss = _mlp_problem()
    before = [p.detach().clone() for p in model.parameters()]
    per_tensor = (torch.full((2,), 1e-3), torch.full((2,), 1e-2))
    torch.manual_seed(5)  # the same Hutchinson draws for both calls
    per = hypergradient(params, *per_tensor, train_loss, val_loss, estimator=estimator, **opts)
    torch.manual_seed(5)
    lambda1, lambda2 = LAMBDA_FORMS[form]
    total = hypergradient(params, lambda1, lambda2, train_loss, val_loss, estimator=estimator,
                          **opts)
    for p, t in zip(per, total, strict=True):
        assert p.shape == (2,) and p.dtype == torch.float32
        if form == "float":
            assert t.shape == () and t.dtype == torch.float64
        else:
            assert t.shape == (1,) and t.dtype == torch.float32
        torch.testing.assert_close(p.sum().double(), t.double().reshape(()), rtol=1e-5,
                                   atol=1e-7)
    assert float(per[0].abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


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
    ({"unregularized": [torch.ones(2)]}, {}, r"unregularized\[0\]"),
    ({"unregularized": "same"}, {}, "both params and unregularized"),
])
def test_bad_arguments_raise_value_error(args, opts, match):
    _, params, train_loss, val_loss = _mlp_problem()
    if args.get("unregularized") == "same":
        args = {"unregularized": [params[1]]}
    kwargs = {"lambda1": 1e-3, "lambda2": 0.0, "train_loss": train_loss, "val_loss": val_loss,
              "estimator": "identity", **args}
    with pytest.raises(ValueError, match=match):
        hypergradient(params, **kwargs, **opts)
