"""Data-parallel SAE training with ``torch.distributed`` (DDP-style gradient averaging).

:func:`fit_distributed` runs the estimator's own :meth:`~sae.base.BaseSAE.fit` loop on every rank.
Every rank streams the *same* global batch sequence (same seed, same shuffle) and keeps its own
contiguous chunk of each global batch; after ``backward`` the gradients are all-reduced, weighted by
``local_rows / global_rows``, so each optimizer step uses exactly the single-process gradient of the
global batch (up to the order of float additions). The dead-latent tracker is synchronised too. All
ranks hold identical parameters at every step; checkpoints are written by rank 0 only, into the
shared ``checkpoint_dir``, and every rank resumes from them.

Exactness: per-sample objectives (TopK, ReLU, JumpReLU, ... reconstruction and sparsity terms) match
single-process training for the same global batch size and seed. Terms that use whole-batch
statistics are computed per rank on the local chunk: the AuxK normaliser (only while latents are
dead), BatchTopK's batch-level selection, and the logged metrics in ``history_`` (local chunk).

Launch::

    torchrun --nproc-per-node 4 train.py      # train.py calls init_distributed() and fit_distributed()
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .base import BaseSAE
from .checkpoint import LATEST
from .data import is_store, to_tensor

__all__ = ["fit_distributed", "RankBatchView"]

logger = logging.getLogger(__name__)


class RankBatchView:
    """Store-like view yielding this rank's chunk of every shuffled global batch.

    Training batches (``shuffle=True``) are the global batches of the wrapped data, split with
    :func:`torch.tensor_split` into ``world_size`` contiguous chunks; unshuffled reads (used for
    initialisation and finalisation) return full batches, so every rank initialises identically.

    Parameters
    ----------
    data : Tensor [n, d] or ActivationStore
        The full training data (every rank sees the same data set).
    rank, world_size : int
        This process's place in the group.

    Examples
    --------
    >>> view = RankBatchView(torch.randn(8, 3), rank=1, world_size=2)
    >>> next(view.iter_batches(4, shuffle=True, seed=0)).shape
    torch.Size([2, 3])
    """

    def __init__(self, data: Any, *, rank: int, world_size: int) -> None:
        self.data = data
        self.rank, self.world_size = int(rank), int(world_size)
        self.last_rows = (0, 0)  # (local rows, global rows) of the latest training batch
        self._tensor = None if is_store(data) else to_tensor(data, name="fit_distributed")

    # -- the store protocol used by sae.data.StoreSource -----------------------------------------
    def __len__(self) -> int:
        return int(self._tensor.shape[0]) if self._tensor is not None else len(self.data)

    def num_rows(self, layer: str | None = None) -> int:
        if self._tensor is not None:
            return int(self._tensor.shape[0])
        if hasattr(self.data, "num_rows"):
            return int(self.data.num_rows(layer))
        return len(self.data)

    def dim(self, layer: str | None = None) -> int:
        if self._tensor is not None:
            return int(self._tensor.shape[1])
        return int(self.data.dim(layer) if layer is not None else self.data.dim())

    @property
    def metadata(self) -> dict:
        return dict(getattr(self.data, "metadata", {}) or {})

    @property
    def layers(self) -> list[str]:
        return list(getattr(self.data, "layers", []) or [])

    def _global_batches(self, batch_size: int, **kw: Any) -> Iterator[Tensor]:
        if self._tensor is None:
            yield from self.data.iter_batches(batch_size, **kw)
            return
        # Same order as sae.data.TensorSource: StoreSource passes the already-salted epoch seed.
        n = int(self._tensor.shape[0])
        order = None
        if kw.get("shuffle", True):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(kw.get("seed", 0))))
        n_batches = n // batch_size if kw.get("drop_last", False) else -(-n // batch_size)
        for i in range(int(kw.get("start_batch", 0)), n_batches):
            sl = slice(i * batch_size, min(n, (i + 1) * batch_size))
            yield self._tensor[order[sl]] if order is not None else self._tensor[sl]

    def iter_batches(self, batch_size: int, **kw: Any) -> Iterator[Tensor]:
        shuffle = kw.get("shuffle", True)
        for b in self._global_batches(batch_size, **kw):
            if not shuffle:
                yield b
                continue
            local = torch.tensor_split(b, self.world_size)[self.rank]
            self.last_rows = (int(local.shape[0]), int(b.shape[0]))
            yield local


def _broadcast_int(value: int, group: Any) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0, group=group)
    return int(t.item())


def _copy_latest(src: Path, dst: Path) -> None:
    """Copy the latest checkpoint of ``src`` (latest.json and the files it names) to ``dst``."""
    import json

    latest = src / LATEST
    if not latest.is_file():
        return
    info = json.loads(latest.read_text())
    for v in info.values():
        if isinstance(v, str) and (src / v).is_file():
            shutil.copy2(src / v, dst / v)
    shutil.copy2(latest, dst / LATEST)


def fit_distributed(
    estimator: BaseSAE,
    X: Any,
    *,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    callbacks: Sequence[Any] | None = None,
    layer: str | None = None,
    group: Any = None,
) -> BaseSAE:
    """Train ``estimator`` data-parallel over the ranks of the default (or given) process group.

    Every rank calls this with the same estimator parameters and the same data (a tensor, or an
    ActivationStore on a shared file system, e.g. a merged store from
    :func:`concepts.distributed.extract_distributed`). ``batch_size`` is the *global* batch size.
    Without an initialised process group (or with one rank) this is ``estimator.fit(...)``.

    Parameters
    ----------
    estimator : BaseSAE
        Any SAE of this package (TopKSAE, ReLUSAE, ...). If ``random_state`` is None, rank 0's seed
        is broadcast and set on every rank's estimator.
    X : Tensor [n, d], array-like or ActivationStore
        Full training data, identical on every rank.
    resume : bool
        Continue from the latest checkpoint in the shared ``checkpoint_dir`` (all ranks restart).
    checkpoint_dir : path, optional
        Shared checkpoint directory (default: the estimator's). Written by rank 0 only.
    callbacks : sequence of callables, optional
        As in :meth:`BaseSAE.fit`, on every rank.
    layer : str, optional
        Layer of a multi-layer store.
    group : ProcessGroup, optional
        Default: the default group.

    Returns
    -------
    BaseSAE
        ``estimator``, fitted; identical parameters on every rank.

    Raises
    ------
    ValueError
        If ``resume=True`` without a checkpoint directory, the ranks disagree on data size, or the
        estimator resamples dead latents (``resample_dead``).

    Examples
    --------
    >>> from sae import TopKSAE  # doctest: +SKIP
    >>> sae = fit_distributed(TopKSAE(64, 8, batch_size=1024, random_state=0), store)  # doctest: +SKIP
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return estimator.fit(X, resume=resume, checkpoint_dir=checkpoint_dir, callbacks=callbacks, layer=layer)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if getattr(estimator, "resample_dead", None):
        raise ValueError(
            f"{type(estimator).__name__}(resample_dead={estimator.resample_dead!r}) is not supported by "
            "fit_distributed (each rank would resample from its own part of the batch); set resample_dead=None "
            "and rely on AuxK (auxk_coef) for dead latents."
        )
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else (
        Path(estimator.checkpoint_dir) if estimator.checkpoint_dir is not None else None)
    if resume and ck is None:
        raise ValueError(
            f"fit_distributed(resume=True) needs a checkpoint directory: pass checkpoint_dir=... or set "
            f"{type(estimator).__name__}(checkpoint_dir=...)."
        )
    if estimator.random_state is None:
        seed = int(np.random.SeedSequence().entropy % (2**31)) if rank == 0 else 0
        estimator.set_params(random_state=_broadcast_int(seed, group))
    view = RankBatchView(X, rank=rank, world_size=world)
    n = view.num_rows(layer)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64), group=group)
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            f"Every rank must train on the same data set, but the ranks see {[int(s) for s in sizes]} rows. "
            "Pass the full (merged) store or tensor on every rank; fit_distributed splits each batch itself."
        )

    def reduce_grad(p: Tensor) -> None:
        if p.grad is None:
            return
        local, total = view.last_rows
        p.grad.mul_(local / total if total else 0.0)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)

    original_make_optimizer = estimator._make_optimizer
    original_train_step = estimator._train_step
    handles: list[Any] = []

    def make_optimizer(params: list, lr: float, device: torch.device) -> torch.optim.Optimizer:
        for p in params:
            handles.append(p.register_post_accumulate_grad_hook(reduce_grad))
        return original_make_optimizer(params, lr, device)

    def train_step(module, opt, params, x, tracker, ctx, counters, device):  # noqa: ANN001, ANN202
        if not getattr(tracker, "_ck_synced", False):
            update = tracker.update

            def synced_update(fired: Tensor, n_samples: int) -> None:
                f = fired.to(torch.int32)
                dist.all_reduce(f, op=dist.ReduceOp.MAX, group=group)
                update(f.bool(), view.last_rows[1] or n_samples)

            tracker.update = synced_update
            tracker._ck_synced = True
        return original_train_step(module, opt, params, x, tracker, ctx, counters, device)

    tmp = None
    if ck is not None and rank != 0:  # other ranks write throw-away checkpoints, resume from rank 0's
        tmp = tempfile.TemporaryDirectory(prefix=f"conceptkit-rank{rank}-")
        if resume:
            _copy_latest(ck, Path(tmp.name))
        run_dir: Path | None = Path(tmp.name)
    else:
        run_dir = ck
    dist.barrier(group=group)
    estimator._make_optimizer = make_optimizer  # type: ignore[method-assign]
    estimator._train_step = train_step  # type: ignore[method-assign]
    try:
        estimator.fit(view, resume=resume, checkpoint_dir=run_dir, callbacks=callbacks, layer=layer)
    finally:
        del estimator._make_optimizer
        del estimator._train_step
        for h in handles:
            h.remove()
        if tmp is not None:
            tmp.cleanup()
    estimator.training_stats_["world_size"] = world
    return estimator
