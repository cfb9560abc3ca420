"""Data-parallel runs (cvsparse.train.distributed): two gloo ranks on the CPU, started by
``python -m torch.distributed.run``, against one-process runs with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml

from cvsparse.batches import BatchLoader
from cvsparse.config import from_dict
from cvsparse.train import Trainer, checkpoint
from cvsparse.train.distributed import Ranks, RankShard, bounds

from .cli_helpers import cli_env, run_cli, tiny_yaml

#: A few steps per epoch of LeNet-300 (no BatchNorm: the sharded global batch is the same
#: mathematics) on the MNIST fixture; the last validation batch (251 = 200 + 51 images) splits
#: unevenly over 2 ranks (26 + 25), and the hyper passes take it.
RUN = {
    "data": {"batch_size": 64, "val_size": 251, "val_batch_size": 200},
    "optim": {"epochs": 1, "max_steps_per_epoch": 5},
}
CVGRAD = {"outer": 3, "hyper_batches": 2, "online_every": 2, "threshold_start_epoch": 0,
          "estimator": "cg", "estimator_opts": {"iters": 2}, "lambda1": 1e-3,
          "release_masks": True, "release_batches": 2}
AUTOPRUNE = {"aux_l1": 0.05, "aux_lr": 0.5, "finetune_epochs": 1}


def torchrun(*args: object, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC ARGS``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=300)


def masks(state: dict) -> list[torch.Tensor]:
    return [s["mask"] for s in state["optimizer"]["state"].values() if "mask" in s]


# ---- sharding (no process group) ----------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_bounds_split_like_tensor_split(world):
    for n in range(0, 11):
        pieces = torch.arange(n).tensor_split(world)
        spans = [bounds(n, rank, world) for rank in range(world)]
        assert [torch.arange(n)[lo:hi].tolist() for lo, hi in spans] == \
            [p.tolist() for p in pieces]


def test_rank_shards_rebuild_the_global_batches_augmentation_included():
    images = torch.randint(0, 256, (13, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(13)

    def loader():   # each rank builds its own, from the same seed
        return BatchLoader(images, labels, torch.arange(13), 5, shuffle=True, augment=True,
                           mean=(0.5,), std=(0.25,), crop_padding=2,
                           generator=torch.Generator().manual_seed(7))

    shards = [RankShard(loader(), rank, 2) for rank in range(2)]
    whole = list(loader())
    parts = [list(shard) for shard in shards]
    assert [len(y) for _, y in parts[0]] == [3, 3, 2]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), x)
        assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), y)
    shards[1].augment = False
    assert shards[1].loader.augment is False


def test_one_process_leaves_everything_as_it_is():
    ranks = Ranks()
    model = torch.nn.Linear(3, 2)
    loader = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))]
    assert ranks.shard(loader) is loader and ranks.wrap(model) is model
    assert ranks.loss(F.cross_entropy) is None and ranks.reducer() is None
    assert ranks.sum(1.5, 2) == (1.5, 2)
    assert ranks.join(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        Ranks(2, 2)


# ---- collectives on two gloo ranks ----------------------------------------------------------

_COLLECTIVES = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    from cvsparse.train.distributed import Ranks, RankDivergence

    ranks = Ranks.from_env()
    ranks.join(torch.device("cpu"))
    out = {}
    # uneven shards of one global batch of 5: rank 0 gets 3 samples, rank 1 gets 2
    torch.manual_seed(0)
    x, y, w = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), torch.randn(3, 4)
    lo, hi = (0, 3) if ranks.rank == 0 else (3, 5)
    w.requires_grad_(True)
    loss = ranks.loss(F.cross_entropy)(x[lo:hi] @ w.T, y[lo:hi])
    (grad,) = torch.autograd.grad(loss, w)
    out["loss"] = float(loss)
    out["grad"] = ranks.reduce([grad])[0].tolist()
    out["mean"] = ranks.reduce([torch.full((2, 2), float(ranks.rank))])[0].tolist()
    out["sum"] = ranks.sum(ranks.rank + 1.0)
    state = {"w": torch.ones(4), "steps": [1, 2]}
    ranks.check_agreement(0, {"model": state})
    if ranks.rank == 1:
        state["w"][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    try:
        ranks.check_agreement(4, {"lambda": [0.5], "model": state})
        out["divergence"] = None
    except RankDivergence as exc:
        out["divergence"] = str(exc)
    with open(f"{sys.argv[1]}/rank{ranks.rank}.json", "w") as f:
        json.dump(out, f)
""")


def test_collectives_weight_uneven_shards_and_catch_one_ulp_of_divergence(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(_COLLECTIVES)
    done = torchrun(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    torch.manual_seed(0)   # the oracle: the whole batch in one process
    x, y, w = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), torch.randn(3, 4)
    w.requires_grad_(True)
    loss = F.cross_entropy(x @ w.T, y)
    (grad,) = torch.autograd.grad(loss, w)
    for out in results:
        assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(torch.tensor(out["grad"]), grad, rtol=1e-5, atol=1e-7)
        assert out["mean"] == [[0.5, 0.5], [0.5, 0.5]]
        assert out["sum"] == [3.0]
        assert out["divergence"] == "after epoch 5 the model of rank(s) 1 differs from rank 0's"


# ---- whole runs ---------------------------------------------------------------------------

@pytest.mark.parametrize("method, section", [("cvgrad", CVGRAD), ("autoprune", AUTOPRUNE)])
def test_two_ranks_follow_the_one_process_run(tmp_path, method, section):
    recipe = tiny_yaml(tmp_path, method=method, data=RUN["data"], optim=RUN["optim"],
                       cvgrad={"outer": 3, **(section if method == "cvgrad" else {})},
                       **({method: section} if method == "autoprune" else {}))
    one = run_cli("train", "--config", recipe, "--out", tmp_path / "one", "--quiet")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "cvsparse", "train", "--config", recipe, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1   # rank 0 alone prints
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert [r["world_size"] for r in reports] == [1, 2]
    states = [checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("one", "two")]
    for name, weight in states[0]["model"].items():
        torch.testing.assert_close(states[1]["model"][name], weight, rtol=1e-4, atol=1e-6)
    if method == "cvgrad":
        history = [r["lambda_history"] for r in reports]
        assert len(history[0]) == 4 and history[0][-1]["lambda1"] != history[0][0]["lambda1"]
        for a, b in zip(*history, strict=True):
            assert b["lambda1"] == pytest.approx(a["lambda1"], rel=1e-5)
            assert b["lambda2"] == pytest.approx(a["lambda2"], rel=1e-5)
        found = [masks(s["method"]) for s in states]
        assert len(found[0]) == 3 and sum(int((~m).sum()) for m in found[0]) > 0
        assert all(torch.equal(a, b) for a, b in zip(*found, strict=True))
    else:
        gates = [{k: v > 0 for k, v in s["model"].items() if k.endswith(".aux")}
                 for s in states]
        assert gates[0] and any(not bool(g.all()) for g in gates[0].values())
        assert all(torch.equal(gates[0][k], gates[1][k]) for k in gates[0])
    rows = [[json.dumps(r[k]) for k in ("val_acc", "test_acc", "params_nonzero")]
            for r in reports]
    assert rows[0] == rows[1]


def test_a_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    recipe = tiny_yaml(tmp_path, data=RUN["data"], optim=RUN["optim"], cvgrad=CVGRAD)
    whole = run_cli("train", "--config", recipe, "--out", tmp_path / "whole", "--quiet")
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = from_dict(yaml.safe_load(recipe.read_text()))   # the same run, stopped after 2 of 3
    Trainer(cut, tmp_path / "cut", progress=False).run(max_epochs=2)
    resumed = torchrun("-m", "cvsparse", "train", "--resume", tmp_path / "cut", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "cut")]
    assert reports[1]["world_size"] == 2 and reports[1]["epochs"] == 3
    for a, b in zip(reports[0]["lambda_history"], reports[1]["lambda_history"], strict=True):
        assert b["lambda1"] == pytest.approx(a["lambda1"], rel=1e-5)


_COMPRESS = textwrap.dedent("""
    import os, sys
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    import cvsparse

    torch.manual_seed(0)
    x, y = torch.randn(600, 20), torch.randint(0, 4, (600,))
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

    def loader(lo, hi, shuffle):
        return DataLoader(TensorDataset(x[lo:hi], y[lo:hi]), batch_size=50, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(1))

    result = cvsparse.compress(model, loader(0, 400, True), loader(400, 500, False),
                               test_loader=loader(500, 600, False), epochs=1, outer=3,
                               lambda1=1e-3, threshold_start_epoch=0, hyper_batches=1,
                               estimator="cg", estimator_opts={"iters": 2},
                               max_steps_per_epoch=4, threads=1, out=sys.argv[1] + "/run")
    rank = os.environ.get("RANK", "0")
    torch.save({"state": result.model.state_dict(), "report": result.report},
               f"{sys.argv[1]}/rank{rank}.pt")
""")


def test_compress_inside_a_process_group_follows_the_one_process_run(tmp_path):
    script = tmp_path / "compress.py"
    script.write_text(_COMPRESS)
    (tmp_path / "one").mkdir()
    one = subprocess.run([sys.executable, script, tmp_path / "one"], capture_output=True,
                         text=True, env=cli_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    (tmp_path / "two").mkdir()
    two = torchrun(script, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    single = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    assert single["report"]["world_size"] == 1
    assert [r["report"]["world_size"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value)   # ranks agree exactly
        torch.testing.assert_close(value, single["state"][name], rtol=1e-4, atol=1e-6)
        assert torch.equal(value == 0, single["state"][name] == 0)   # the same zeros
    assert sum(int((v == 0).sum()) for v in single["state"].values()) > 0
    history = [single["report"]["lambda_history"], ranks[0]["report"]["lambda_history"]]
    assert len(history[0]) == 4 and history[0][-1]["lambda1"] != history[0][0]["lambda1"]
    for a, b in zip(*history, strict=True):
        assert b["lambda1"] == pytest.approx(a["lambda1"], rel=1e-5)
    assert (tmp_path / "two" / "run" / "report.json").is_file()
    assert json.loads((tmp_path / "two" / "run" / "report.json").read_text())["world_size"] == 2


def test_a_global_batch_smaller_than_the_world_is_refused_before_any_work(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    config = from_dict({"model": "lenet300", "data": {"batch_size": 3}})
    with pytest.raises(ValueError, match=r"^data.batch_size \(3\) must be at least the number "
                                         r"of ranks \(4\)"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match=r"^\$RANK must be an integer, got 'x'$"):
        Ranks.from_env()


def test_an_accuracy_constrained_run_on_two_ranks_keeps_the_same_network(tmp_path):
    """The probes average their gradients and count their accuracy over both ranks, so the
    verdicts, the kept support and the reference are the one-process run's."""
    recipe = tiny_yaml(tmp_path, data=RUN["data"], optim={"epochs": 4, "max_steps_per_epoch": 8},
                       cvgrad={"outer": 2, "lambda1": 1e-3},
                       accuracy={"max_accuracy_drop": 5.0, "probe_fraction": 0.5,
                                 "max_compression": 50.0})
    one = run_cli("train", "--config", recipe, "--out", tmp_path / "one", "--quiet")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "cvsparse", "train", "--config", recipe, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert reports[0]["constraint_checks"] > 3
    for key in ("selected_at", "drive_stopped_at", "constraint_checks", "params_nonzero"):
        assert reports[1][key] == reports[0][key], key
    for key in ("reference_val_acc", "selected_val_acc", "selected_compression"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=1e-6), key
