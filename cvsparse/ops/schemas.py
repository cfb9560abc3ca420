"""Operator schemas of the ``cvsparse`` library, mirrored from ``csrc/ops.cpp``.

They are used to define the operators from Python when the compiled library is missing, so
``torch.ops.cvsparse.*`` always exists; ``tests/ops/test_registration.py`` checks that both
sources agree.
"""

SCHEMAS: dict[str, str] = {
    "prox_sgd_": (
        "prox_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_bufs, "
        "Tensor[] masks, Tensor lambda1, Tensor lambda2, float lr, float momentum) -> Tensor"
    ),
    "mixed_partial_dot": (
        "mixed_partial_dot(Tensor[] params, Tensor[] vectors, Tensor[] precond) -> Tensor"
    ),
    "max_abs": "max_abs(Tensor[] tensors) -> Tensor",
    "threshold_": (
        "threshold_(Tensor(a!)[] params, Tensor(b!)[] momentum_bufs, Tensor(c!)[] masks, "
        "float tau) -> Tensor"
    ),
    "gated_weight": (
        "gated_weight(Tensor weight, Tensor aux, int ste, float slope, bool sign_rule) -> Tensor"
    ),
    "gated_weight_backward": (
        "gated_weight_backward(Tensor grad, Tensor weight, Tensor aux, int ste, float slope, "
        "bool sign_rule) -> (Tensor, Tensor)"
    ),
    "sparse_matmul": (
        "sparse_matmul(Tensor input, Tensor values, Tensor col_deltas, Tensor row_ptr, "
        "Tensor? bias, bool relu) -> Tensor"
    ),
    "sparse_conv2d": (
        "sparse_conv2d(Tensor input, Tensor values, Tensor col_deltas, Tensor row_ptr, "
        "Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, bool relu) -> Tensor"
    ),
}

# Straight-through estimator codes passed as ``ste`` to ``gated_weight_backward``.
STE_CODES: dict[str, int] = {"linear": 0, "leaky_relu": 1, "softplus": 2}
