"""Data-parallel training with ``torch.distributed`` (``torchrun --nproc_per_node N -m cvsparse
train ...``; docs/distributed.md).

Every rank holds the whole data set and draws the same global batches from identically seeded
generators; :class:`RankShard` hands each rank its contiguous share of every global batch, so
``data.batch_size`` is the *global* batch.  Training gradients are averaged by
``DistributedDataParallel``; the gradients and Hessian-vector products the hyper steps compute
with ``torch.autograd.grad`` (which DDP does not see) are averaged by :meth:`Ranks.reduce`.  The
training loss is :meth:`Ranks.loss`: its value is the global batch mean (so every rank's step
guard judges the same number), and its gradient is weighted by the rank's share of the batch
(so the average over ranks is the global batch mean gradient even when a final batch does not
split evenly).  :meth:`Ranks.check_agreement` compares a digest of the model and the method
state (λ, masks, gates, optimizer buffers) across ranks after every epoch.

A :class:`Ranks` of one process (``world_size == 1``) changes nothing: every helper returns its
input, so single-process runs are the same bit for bit.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cvsparse import metrics
from cvsparse.faults import Diverged

from . import checkpoint

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Iterable[tuple[Tensor, Tensor]]


class RankDivergence(Diverged):
    """The ranks of a data-parallel run no longer hold the same model or method state."""


class Ranks:
    """This process's place in a data-parallel run: ``rank`` in ``[0, world_size)``,
    ``local_rank`` its index on its node (which GPU it uses)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise ValueError(f"bad process group position: rank {rank} of world size "
                             f"{world_size}, local rank {local_rank}")
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device("cpu")   # where collectives' tensors live, set by join()

    @classmethod
    def from_env(cls) -> Ranks:
        """The default process group's ranks if one is initialized (e.g. by the caller of
        ``cvsparse.compress``), else what ``torchrun`` put into ``RANK``, ``WORLD_SIZE`` and
        ``LOCAL_RANK`` (absent: one process).  Nothing is joined yet: see :meth:`join`."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
        rank = _env_int("RANK", 0)
        return cls(rank, _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", rank))

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes files and prints."""
        return self.rank == 0

    def join(self, device: torch.device) -> torch.device:
        """Initialize the default process group (NCCL for a CUDA ``device``, else gloo) from
        the ``torchrun`` environment unless one is initialized; returns this rank's device
        (``cuda:LOCAL_RANK`` for CUDA).  One process: ``device`` unchanged, nothing joined."""
        if not self.active:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            atexit.register(_leave)
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(f"the process group (rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}) is not the one the environment names "
                             f"(rank {self.rank} of {self.world_size})")
        self.device = device
        return device

    def check_batch_sizes(self, **sizes: int) -> None:
        """ValueError unless every global batch size in ``sizes`` gives each rank a sample."""
        for name, size in sizes.items():
            if size < self.world_size:
                raise ValueError(f"{name} ({size}) must be at least the number of ranks "
                                 f"({self.world_size}): every rank takes a share of each batch")

    # ---- data ---------------------------------------------------------------------------------

    def shard(self, loader: Any) -> Any:
        """``loader`` as this rank sees it: a :class:`RankShard` (the loader itself in one
        process)."""
        return RankShard(loader, self.rank, self.world_size) if self.active else loader

    def evaluate(self, model: nn.Module, loader: Batches, *args: Any) -> dict[str, Any]:
        """:func:`cvsparse.metrics.evaluate` (``args``: its further arguments) over the whole
        split: each rank evaluates its shards, the sums are added up over the ranks."""
        return self.combined(metrics.evaluate(model, loader, *args))

    def combined(self, part: dict[str, Any]) -> dict[str, Any]:
        """The evaluation of the whole split from each rank's evaluation ``part`` of its
        shards (mean ``loss``, accuracy ``acc`` in [0, 1], sample count ``n``): the sums of
        ``loss · n``, correct predictions and ``n`` over the ranks.  ``part`` in one process."""
        if not self.active:
            return part
        loss, correct, n = self.sum(part["loss"] * part["n"], round(part["acc"] * part["n"]),
                                    part["n"])
        return {**part, "loss": loss / n, "acc": round(correct) / n, "n": round(n)}

    # ---- communication ------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module training steps run through: ``model`` in
        ``DistributedDataParallel`` (which averages the gradients of each backward over the
        ranks and keeps ``model``'s parameter objects), or ``model`` itself in one process."""
        if not self.active:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def loss(self, loss_fn: LossFn) -> LossFn | None:
        """``loss_fn`` (a batch mean) made global: the returned value is the mean over the
        global batch of ``N`` samples (the same on every rank), its gradient the gradient of
        the rank's own batch mean (``n_r`` samples) times ``n_r · world_size / N``, which the
        average over the ranks (DDP, :meth:`reduce`) turns into the gradient of the global
        batch mean.  One scalar all-reduce per call.  None in one process (the method keeps
        its own loss)."""
        if not self.active:
            return None
        world = self.world_size

        def global_loss(outputs: Tensor, targets: Tensor) -> Tensor:
            n = len(targets)
            local = loss_fn(outputs, targets) if n else outputs.sum() * 0.0
            stats = torch.stack([local.detach().double() * n,
                                 torch.tensor(float(n), dtype=torch.float64,
                                              device=local.device)])
            stats = stats.to(self.device)
            dist.all_reduce(stats)
            total = float(stats[1])
            weighted = local * (n * world / total)
            mean = (stats[0] / stats[1]).to(local.device, local.dtype)
            return weighted + (mean - weighted).detach()

        return global_loss

    def reduce(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """The mean over the ranks of each tensor of ``vectors`` (gradients, Hessian-vector
        products), in one all-reduce; new tensors, same shapes and dtypes."""
        if not self.active or not vectors:
            return list(vectors)
        flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in vectors])
        flat = flat.to(self.device)
        dist.all_reduce(flat)
        flat /= self.world_size
        parts = flat.split([v.numel() for v in vectors])
        return [p.view(v.shape).to(v.device, v.dtype) for p, v in zip(parts, vectors,
                                                                       strict=True)]

    def reducer(self) -> Callable[[Sequence[Tensor]], list[Tensor]] | None:
        """:meth:`reduce` for ``RunData.reduce``; None in one process."""
        return self.reduce if self.active else None

    def sum(self, *values: float) -> tuple[float, ...]:
        """Each of ``values`` summed over the ranks (float64); ``values`` themselves in one
        process."""
        if not self.active:
            return values
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return tuple(totals.tolist())

    def check_agreement(self, epoch: int, parts: dict[str, Any]) -> None:
        """RankDivergence (on every rank) unless every rank holds the same ``parts``
        (name → nested dicts / lists of tensors and plain values), compared by a digest of
        their bytes: one all-gather of ``len(parts)`` int64 per rank.  Nothing in one
        process."""
        if not self.active:
            return
        mine = torch.tensor([int.from_bytes(fingerprint(v)[:8], "little", signed=True)
                             for v in parts.values()], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        for column, name in enumerate(parts):
            ranks = [r for r in range(1, self.world_size)
                     if gathered[r][column] != gathered[0][column]]
            if ranks:
                raise RankDivergence(f"after epoch {epoch + 1} the {name} of rank(s) "
                                     f"{', '.join(map(str, ranks))} differs from rank 0's")


class RankShard:
    """Rank ``rank``'s share of every batch of ``loader`` (``world_size`` ranks): the
    contiguous slice ``bounds(len(batch), rank, world_size)``.  Every rank iterates the same
    global batches (same generator seed), so the shards of one batch are disjoint and cover
    it, and augmentation draws are those of a one-process run.  ``augment`` reads and sets the
    wrapped loader's."""

    def __init__(self, loader: Any, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            lo, hi = bounds(len(y), self.rank, self.world_size)
            yield x[lo:hi], y[lo:hi]

    @property
    def augment(self) -> bool:
        return self.loader.augment

    @augment.setter
    def augment(self, on: bool) -> None:
        self.loader.augment = on


def bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s share of ``n`` samples: ``n // world_size`` each, the
    first ``n % world_size`` ranks one more (``torch.tensor_split``'s split)."""
    q, r = divmod(n, world_size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def fingerprint(value: Any) -> bytes:
    """SHA-256 of ``value`` (a state a checkpoint could hold), as the checkpoint's checksum
    walks it: tensors by dtype, shape and bytes, mappings in their order, sequences element by
    element."""
    return bytes.fromhex(checkpoint.digest(value))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
