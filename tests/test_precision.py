"""Mixed precision and channels-last (cvsparse.precision, ``--precision``, ``--channels-last``).

Oracles: the fp32 step (for the bf16 and fp16 steps, within the reduced dtype's tolerance), an
explicitly cast bf16 forward pass and the reference proximal update (for what autocast and the
fused step compute), the contiguous model (for channels-last), an uninterrupted run (for the
resumed fp16 run with its loss scaler) and the fp32 run's λ path (for the bf16 run's).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train.cli_helpers import one_line_error, run_cli, tiny_yaml

import cvsparse
from cvsparse import cli, faults, metrics, precision
from cvsparse.config import RunConfig, from_dict
from cvsparse.faults import SkippedStep, StepGuard
from cvsparse.methods.base import supervised_step
from cvsparse.nn import convert
from cvsparse.ops import gated_weight, reference
from cvsparse.optim import ProxSGD
from cvsparse.precision import Precision
from cvsparse.train import Trainer
from cvsparse.validation import validate

CL = torch.channels_last
#: Asserted once each, in test_fp16_overflow_skips_the_step_and_lowers_the_scale and
#: test_bf16_without_onednn_kernels_warns.
pytestmark = [pytest.mark.filterwarnings("ignore:fp16 on the CPU:UserWarning"),
              pytest.mark.filterwarnings("ignore:bf16 on this CPU:UserWarning")]
LR, MOMENTUM, LAMBDA1, LAMBDA2 = 0.1, 0.9, 1e-3, 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyCNN(nn.Module):
    """Conv → BatchNorm (or nothing) → ReLU → max-pool → Linear, on ``(N, 3, 8, 8)`` inputs,
    5 classes."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if norm else nn.Identity()
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def tiny(seed: int = 0, norm: bool = True) -> tuple[TinyCNN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyCNN(norm)
    x = torch.randn(16, 3, 8, 8)
    y = torch.randint(0, 5, (16,))
    return model, x, y


def prox(model: nn.Module) -> ProxSGD:
    """ProxSGD as cvgrad builds it: L1 + L2 on the Conv/Linear weights, nothing on the rest."""
    weights = [model.conv.weight, model.fc.weight]
    ids = {id(w) for w in weights}
    others = [p for p in model.parameters() if id(p) not in ids]
    return ProxSGD([{"params": weights},
                    {"params": others, "lambda1": 0.0, "lambda2": 0.0}],
                   lr=LR, momentum=MOMENTUM, lambda1=LAMBDA1, lambda2=LAMBDA2)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- one step ---------------------------------------------------------------------------------

def test_fp32_default_is_the_plain_step_bit_for_bit():
    model, x, y = tiny()
    plain, explicit = copy.deepcopy(model), copy.deepcopy(model)
    opt = prox(plain)
    opt.zero_grad()
    F.cross_entropy(plain(x), y).backward()    # the step as it was written before precision
    opt.step()
    for m, kwargs in ((model, {}), (explicit, {"precision": Precision("fp32")})):
        supervised_step(m, prox(m), x, y, StepGuard(10), **kwargs)
        for (name, a), b in zip(plain.state_dict().items(), m.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), name


def absolute_gradients(model: TinyCNN, x: torch.Tensor, y: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """Per parameter of the BatchNorm-free TinyCNN, its fp32 gradient's sum of absolute terms
    (``Σ|input|·|output gradient|``): the scale that rounding errors of the terms are
    relative to.  A weight gradient sums terms of both signs (1024 per convolution weight
    here) to about a tenth of this, so bf16's relative rounding 2^-8 is not small next to
    the gradient itself."""
    seen = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            seen[name] = (args[0].detach(), out)
        return hook

    handles = [model.conv.register_forward_hook(keep("conv")),
               model.fc.register_forward_hook(keep("fc"))]
    F.cross_entropy(model(x), y).backward()
    for handle in handles:
        handle.remove()
    (xc, oc), (xf, of) = seen["conv"], seen["fc"]
    return {"conv.weight": torch.nn.grad.conv2d_weight(xc.abs(), model.conv.weight.shape,
                                                      oc.grad.abs(), padding=1),
            "conv.bias": oc.grad.abs().sum((0, 2, 3)),
            "fc.weight": of.grad.abs().t() @ xf.abs(),
            "fc.bias": of.grad.abs().sum(0)}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name, unit", [("bf16", 2**-8), ("fp16", 2**-11)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_reduced_precision_step_keeps_fp32_weights_close_to_the_fp32_step(
        name, unit, seed, device, monkeypatch):
    if device == "cuda":   # the oracle is fp32: no TF32 products (CPU products have none)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    # without BatchNorm, whose backward pass cancels the convolution's bias gradient exactly
    model, x, y = (t.to(device) for t in tiny(seed, norm=False))
    scale = absolute_gradients(copy.deepcopy(model), x, y)
    half = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    reduced = Precision(name, device=device)
    loss32, _ = supervised_step(model, prox(model), x, y)
    loss16, logits16 = supervised_step(half, prox(half), x, y, StepGuard(10),
                                       precision=reduced)
    if reduced.scaler is not None:
        assert reduced.scaler.get_scale() == 65536.0   # no overflow: the step was taken
    assert logits16.dtype == torch.float32 and loss16.dtype == torch.float32
    assert abs(float(loss16) - float(loss32)) <= unit * float(loss32)
    for (key, p32), p16, w0 in zip(model.named_parameters(), half.parameters(), before,
                                   strict=True):
        assert p16.dtype == torch.float32 and p16.grad.dtype == torch.float32, key
        # a few roundings of the unit on the absolute terms (measured: at most 2.7 of them)
        bound = 8 * unit * float(scale[key].norm())
        assert float((p16.grad - p32.grad).norm()) <= bound, key
        step16, step32 = p16.detach() - w0, p32.detach() - w0   # the proximal steps taken
        assert float((step16 - step32).norm()) <= LR * bound, key


def manual_bf16_forward(model: TinyCNN, x: torch.Tensor, conv_weight: torch.Tensor,
                        fc_weight: torch.Tensor) -> torch.Tensor:
    """TinyCNN's forward pass with the casts autocast makes, written out: convolution and
    linear layer on bfloat16 copies of their inputs and (float32) parameters; BatchNorm,
    ReLU and pooling on what they receive."""
    bf = torch.bfloat16
    h = F.conv2d(x.to(bf), conv_weight.to(bf), model.conv.bias.to(bf), padding=1)
    h = F.max_pool2d(F.relu(model.bn(h)), 2).flatten(1)
    return F.linear(h.to(bf), fc_weight.to(bf), model.fc.bias.to(bf))


def test_bf16_step_is_the_cast_forward_then_the_proximal_step_on_fp32_weights():
    model, x, y = tiny()
    manual = copy.deepcopy(model)
    supervised_step(model, prox(model), x, y, precision=Precision("bf16"))
    loss = F.cross_entropy(manual_bf16_forward(manual, x, manual.conv.weight,
                                               manual.fc.weight).float(), y)
    loss.backward()
    params = list(manual.parameters())
    expected = [p.detach().clone() for p in params]
    regularized = {id(manual.conv.weight), id(manual.fc.weight)}
    lam1 = torch.tensor([LAMBDA1 if id(p) in regularized else 0.0 for p in params],
                        dtype=torch.float64)
    lam2 = torch.tensor([LAMBDA2 if id(p) in regularized else 0.0 for p in params],
                        dtype=torch.float64)
    reference.prox_sgd_(expected, [p.grad for p in params], [torch.zeros_like(p) for p in params],
                        [], lam1, lam2, LR, MOMENTUM)
    for (name, p), g, w in zip(model.named_parameters(), params, expected, strict=True):
        torch.testing.assert_close(p.grad, g.grad, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(model.buffers(), manual.buffers(), strict=True):   # BatchNorm statistics
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_autoprune_gates_under_autocast_match_the_cast_gated_forward():
    model, x, y = tiny()
    torch.manual_seed(1)
    convert(model, ste="leaky_relu")
    manual = copy.deepcopy(model)
    opt = ProxSGD(list(model.parameters()), lr=LR, momentum=MOMENTUM)
    supervised_step(model, opt, x, y, precision=Precision("bf16"))
    conv, fc = manual.conv, manual.fc
    gated = [gated_weight(m.weight, m.aux, ste=m.ste, slope=m.slope, update=m.update)
             for m in (conv, fc)]
    assert all(g.dtype == torch.float32 for g in gated)   # the op runs on fp32 master weights
    F.cross_entropy(manual_bf16_forward(manual, x, *gated).float(), y).backward()
    for (name, p), q in zip(model.named_parameters(), manual.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert model.conv.aux.grad.abs().sum() > 0             # the straight-through gradient


def test_channels_last_step_matches_the_contiguous_step():
    model, x, y = tiny()
    last = Precision("fp32", channels_last=True).prepare(copy.deepcopy(model))
    seen = []
    last.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].is_contiguous(memory_format=CL)))
    loss, logits = supervised_step(model, prox(model), x, y)
    loss_cl, logits_cl = supervised_step(last, prox(last), x, y,
                                         precision=Precision("fp32", channels_last=True))
    assert seen == [True]
    torch.testing.assert_close(logits_cl, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_cl, loss, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(last.named_parameters(), model.parameters(), strict=True):
        if a.dim() == 4:
            assert a.is_contiguous(memory_format=CL) and not a.is_contiguous(), name
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_kernels_are_detected_as_pytorch_routes_the_convolution():
    """Oracle: the profiler's record of which kernel a bf16 autocast convolution ran, oneDNN's
    or the reference one; ``cpu_has_bf16_kernels`` must name it on this machine."""
    conv, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    with torch.autograd.profiler.profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)
    ran = {event.key for event in prof.key_averages()}
    assert ("aten::mkldnn_convolution" in ran) == precision.cpu_has_bf16_kernels(), ran
    assert ("aten::_slow_conv2d_forward" in ran) != precision.cpu_has_bf16_kernels(), ran


@pytest.mark.parametrize("native", [True, False])
def test_bf16_without_onednn_kernels_warns(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Precision("bf16")
        Precision("fp32")
    bf16 = [str(w.message) for w in caught if str(w.message).startswith("bf16 on this CPU")]
    assert len(bf16) == (0 if native else 1) and all("use fp32 here" in m for m in bf16)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model, x, y = tiny()
    with pytest.warns(UserWarning, match="fp16 on the CPU runs convolutions far more slowly"):
        fp16 = Precision("fp16")
    state = fp16.scaler.state_dict()
    fp16.scaler.load_state_dict({**state, "scale": 2.0**60})   # scaled gradients overflow
    before = copy.deepcopy(model.state_dict())
    opt = prox(model)
    with pytest.raises(SkippedStep, match="overflowed"):
        supervised_step(model, opt, x, y, StepGuard(10), precision=fp16)
    assert fp16.scaler.get_scale() == 2.0**59
    supervised_step(model, opt, x, y, precision=fp16)           # no guard: skipped quietly
    assert fp16.scaler.get_scale() == 2.0**58
    params = dict(model.named_parameters())
    for name, value in before.items():
        if name in params:
            assert torch.equal(params[name].detach(), value), name


def test_evaluation_runs_under_autocast():
    model, x, y = tiny()
    model.eval()
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    bf16 = metrics.evaluate(model, loader, precision=Precision("bf16", channels_last=True))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert bf16["loss"] == pytest.approx(float(F.cross_entropy(logits.float(), y)), rel=1e-6)
    fp32 = metrics.evaluate(model, loader)
    assert bf16["loss"] != fp32["loss"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)


# ---- settings ---------------------------------------------------------------------------------

def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Precision("fp8")
    with pytest.raises(ValueError, match="channels_last"):
        Precision("fp32", channels_last="yes")
    config = RunConfig()
    config.precision = "fp8"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        validate(config)
    with pytest.raises(ValueError, match="config key channels_last must be true or false"):
        from_dict({"channels_last": "yes"})
    model = TinyCNN()
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))]
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        cvsparse.compress(model, data, data, precision="fp8")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("precision: fp8\n")
    assert cli.main(["train", "--config", str(recipe), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exit_info:
        cli._parser().parse_args(["train", "--precision", "fp8"])
    assert exit_info.value.code == 2


def test_flags_set_their_keys_and_resume_refuses_them():
    args = cli._parser().parse_args(["train", "--precision", "bf16", "--channels-last",
                                     "--out", "unused"])
    config = cli.config_from_args(args)
    assert (config.precision, config.channels_last) == ("bf16", True)
    assert (RunConfig().precision, RunConfig().channels_last) == ("fp32", False)
    for flags in (["--precision", "bf16"], ["--channels-last"]):
        args = cli._parser().parse_args(["train", "--resume", "run", *flags])
        with pytest.raises(ValueError, match=flags[0]):
            cli.resume_config(args, RunConfig())


def test_the_command_trains_with_the_flags_and_resume_refuses_to_change_them(tmp_path):
    out = tmp_path / "run"
    recipe = tiny_yaml(tmp_path, model="lenet5", optim={"lr": 0.01})   # diverges at 0.05
    done = run_cli("train", "--config", recipe, "--precision", "bf16", "--channels-last",
                   "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["precision"], config["channels_last"]) == ("bf16", True)
    refused = run_cli("train", "--resume", out, "--precision", "fp32")
    assert refused.returncode == 2
    assert "--precision" in one_line_error(refused)


def test_unsupported_autocast_dtype_is_detected_and_refused(monkeypatch):
    assert precision.autocast_supported("cpu", torch.bfloat16)
    assert not precision.autocast_supported("cpu", torch.float64)
    monkeypatch.setattr(precision, "autocast_supported", lambda device, dtype: False)
    with pytest.raises(ValueError, match="precision fp16 is not supported on cpu"):
        Precision("fp16")


# ---- whole runs ------------------------------------------------------------------------------

def lenet5_config(precision_: str, channels_last: bool) -> RunConfig:
    """LeNet-5 on the MNIST fixture, 2 epochs of 12 steps, an SGD hyper step on log λ every
    4 steps (no clipping: each step moves λ in proportion to its hypergradient)."""
    return from_dict({
        "model": "lenet5", "threads": 1, "precision": precision_, "channels_last": channels_last,
        "data": {"dataset": "mnist", "batch_size": 64, "val_size": 500, "val_batch_size": 500},
        "optim": {"epochs": 2, "lr": 0.01, "max_steps_per_epoch": 12},
        "cvgrad": {"outer": 1, "hyper_batches": 1, "online_every": 4, "lambda1": 1e-4,
                   "hyper_method": "sgd", "hyper_clip": None, "hyper_lr": 8.0},
    })


def lambda_path(trainer: Trainer, formats: list[bool]) -> list[float]:
    """Run ``trainer``; λ1 after every hyper step.  ``formats`` collects, at every training
    step, whether every 4-D parameter is channels-last."""
    path: list[float] = []
    method = trainer.method
    push, step = method.core.push_lambdas, method.train_step

    def recorded_push() -> None:
        push()
        path.append(float(method.lambdas.lambda1))

    def recorded_step(x, y):
        formats.append(all(p.is_contiguous(memory_format=CL)
                           for p in trainer.model.parameters() if p.dim() == 4))
        return step(x, y)

    method.core.push_lambdas, method.train_step = recorded_push, recorded_step
    trainer.run()
    return path


def test_bf16_channels_last_run_follows_the_fp32_lambda_path(tmp_path):
    formats32: list[bool] = []
    formats16: list[bool] = []
    fp32 = lambda_path(Trainer(lenet5_config("fp32", False), tmp_path / "fp32",
                               progress=False), formats32)
    bf16_trainer = Trainer(lenet5_config("bf16", True), tmp_path / "bf16", progress=False)
    bf16 = lambda_path(bf16_trainer, formats16)
    assert len(fp32) == len(bf16) == 7   # 6 online hyper steps + the end-of-iteration one
    moved = math.log(fp32[-1] / 1e-4)
    assert moved > 0.5                   # λ1 ends ~2x its start: the path is not flat
    gaps = [abs(math.log(a / b)) for a, b in zip(bf16, fp32, strict=True)]
    assert max(gaps) < 0.05, gaps        # measured 0.017 (λ1 1.94e-4 vs 1.98e-4 at the end)
    assert formats16 == [True] * 24 and formats32 == [False] * 24
    report = bf16_trainer.report()
    assert (report["config"]["precision"], report["config"]["channels_last"]) == ("bf16", True)


def test_fp16_resume_restores_the_loss_scaler_bit_for_bit(tmp_path, monkeypatch):
    config = from_dict({
        "model": "lenet300", "threads": 1, "precision": "fp16",
        "data": {"dataset": "mnist", "batch_size": 32, "val_size": 500, "val_batch_size": 500},
        "optim": {"epochs": 2, "lr": 0.05, "max_steps_per_epoch": 6},
        "cvgrad": {"outer": 2, "hyper_batches": 1, "online_every": 2},
    })

    def run(folder: str, max_epochs: int | None = None) -> Trainer:
        # the 2nd gradient of the run is NaN (the $CVSPARSE_TEST_FAULTS hook): the scaler
        # skips that step and halves its scale, as after an fp16 overflow
        monkeypatch.setattr(faults, "_PLAN", {"grad": {2}})
        monkeypatch.setattr(faults, "_CALLS", dict.fromkeys(faults.KINDS, 0))
        trainer = Trainer(copy.deepcopy(config), tmp_path / folder, progress=False)
        trainer.run(max_epochs)
        return trainer

    full = run("full")
    assert full.rows[0]["skipped_steps"] == 1
    cut = run("cut", max_epochs=1)
    scale_at_cut = cut.precision.scaler.get_scale()
    assert scale_at_cut == 32768.0       # a fresh scaler would start at 65536 again
    del cut
    monkeypatch.setattr(faults, "_PLAN", None)
    resumed = Trainer(RunConfig(), tmp_path / "cut", resume=True, progress=False)
    assert resumed.precision.scaler.get_scale() == scale_at_cut
    resumed.run()
    assert resumed.precision.state_dict() == full.precision.state_dict()
    for (name, a), b in zip(full.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert torch.equal(full.method.lambdas.lambda1, resumed.method.lambdas.lambda1)


#: Settings that make each method prune within two tiny epochs (as tests/test_api.py).
PRUNING = {
    "cvgrad": {"outer": 1, "lambda1": 3e-2, "threshold_start_epoch": 0, "finetune_epochs": 1},
    "autoprune": {"aux_l1": 5e-2, "aux_lr": 0.5, "finetune_epochs": 1},
    "magnitude": {"target_compression": 5.0, "finetune_epochs": 1},
}


@pytest.mark.parametrize("method", list(PRUNING))
def test_compress_takes_precision_and_channels_last(method):
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 5, (64,))
    train = DataLoader(TensorDataset(x[:48], y[:48]), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[48:], y[48:]), batch_size=16)
    model = TinyCNN()
    result = cvsparse.compress(model, train, val, method=method, epochs=2, lr=0.05,
                               precision="bf16", channels_last=True, **PRUNING[method])
    assert (result.report["config"]["precision"],
            result.report["config"]["channels_last"]) == ("bf16", True)
    assert result.model is model
    assert model.conv.weight.is_contiguous(memory_format=CL)   # AutoPrune's stripped too
    assert all(p.dtype == torch.float32 for p in model.parameters())
    weights = [model.conv.weight, model.fc.weight]
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    assert result.report["params_nonzero"] == nonzero < sum(w.numel() for w in weights)
