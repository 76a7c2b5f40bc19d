"""Structured SAE of "I Predict Therefore I Am" (Liu et al., ICLR 2026): sparse + low-rank latents."""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import BaseSAE
from .modules import Activation, LowRankAutoencoder, ReLUActivation, SparseAutoencoder, TrainOutput
from .topk import COMMON_ATTRIBUTES_DOC, COMMON_PARAMETERS_DOC
from .training import resolve_steps, warmup_factor

__all__ = ["StructuredSAE", "nuclear_norm_lowrank"]


def nuclear_norm_lowrank(u: Tensor, v: Tensor) -> Tensor:
    """Exact nuclear norm of ``U V`` for ``U`` [B, r], ``V`` [r, n] in ``O((B + n) r^2)``.

    With ``U = Q_u R_u`` and ``V^T = Q_v R_v`` (thin QR), ``U V = Q_u (R_u R_v^T) Q_v^T`` and the
    singular values of ``U V`` are those of the ``r x r`` matrix ``R_u R_v^T``. Differentiable.

    Examples
    --------
    >>> import torch
    >>> u, v = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    >>> torch.allclose(nuclear_norm_lowrank(u, v), torch.linalg.svdvals(u @ v).sum())
    True
    """
    _, ru = torch.linalg.qr(u)
    _, rv = torch.linalg.qr(v.T)
    return torch.linalg.svdvals(ru @ rv.T).sum()


class StructuredSAE(BaseSAE):
    __doc__ = f"""Structured SAE: sparse concept codes plus a low-rank, nuclear-norm-penalised part.

    The paper summarises its loss as ``E[||f(x) - f_hat(x)||^2 + lambda_t ||S||_{{p_t}}^{{p_t}} +
    gamma ||R||_*]``; the exact parametrisation of ``S`` and ``R`` was not available, so this class
    implements the following reading (see research/sae-anchors.md section 4):

    1. Sparse part ``s = ReLU(W_enc (x - b_dec) + b_enc)`` [B, n].
    2. Low-rank part of the batch latent matrix ``R = U V`` with ``U = (x - b_dec) P`` [B, r] and a
       learned ``V`` [r, n], so every sample's dense latent component lives in an r-dimensional
       subspace of concept space (modelling dependencies between concepts).
    3. Reconstruction ``x_hat = (s + R) D + b_dec`` with unit-norm atoms ``D``.
    4. Loss ``mse + lambda_t * E[sum_i ((s_i + eps)^{{p_t}} - eps^{{p_t}})] + gamma * ||R||_* / B``, the
       nuclear norm computed exactly on the batch matrix (:func:`nuclear_norm_lowrank`).
    5. ``p_t`` follows dictionary_learning's p-annealing: ``p = 1`` until ``p_anneal_start``, then
       ``n_p_updates`` equally spaced moves along ``linspace(1, p_end)``; at each move ``lambda`` is
       rescaled by ``mean L_p / mean L_p_next`` over the last 10 batches so the penalty stays
       continuous. ``lambda`` also warms up linearly over ``sparsity_warmup``.

    ``transform`` returns the sparse part ``s`` (the concept codes); :meth:`transform_lowrank`
    returns ``R``; ``reconstruct`` and ``score`` use both.

    Parameters
    ----------
    n_concepts : int, default=1024
    rank : int, default=8
        Rank ``r`` of the low-rank part.
    l1_coef : float, default=1.0
        Initial sparsity coefficient ``lambda``.
    nuclear_coef : float, default=0.1
        ``gamma``.
    p_end : float, default=0.5
    p_anneal_start : float or int, default=0.5
        When p-annealing starts (fraction of steps or step).
    n_p_updates : int, default=10
    sparsity_warmup : float or int, default=0.05
    {COMMON_PARAMETERS_DOC}
    {COMMON_ATTRIBUTES_DOC}
    Examples
    --------
    >>> import torch
    >>> X = torch.randn(512, 16)
    >>> sae = StructuredSAE(n_concepts=64, rank=2, batch_size=128, random_state=0).fit(X)
    >>> sae.transform_lowrank(X).shape
    torch.Size([512, 64])
    """

    _architecture = "structured"
    _eps = 1e-6

    def __init__(
        self,
        n_concepts: int = 1024,
        *,
        rank: int = 8,
        l1_coef: float = 1.0,
        nuclear_coef: float = 0.1,
        p_end: float = 0.5,
        p_anneal_start: float = 0.5,
        n_p_updates: int = 10,
        sparsity_warmup: float = 0.05,
        n_epochs: int = 1,
        batch_size: int = 1024,
        lr: float | None = None,
        lr_warmup: float = 0.05,
        lr_decay: float = 0.2,
        grad_clip: float | None = 1.0,
        normalize: str = "expected_norm",
        b_dec_init: str = "geometric_median",
        decoder_init: str = "data",
        dead_window: int = 10_000,
        autocast: str | None = None,
        sparse_backend: str = "auto",
        log_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        random_state: int | None = None,
        init_random_state: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        verbose: bool = False,
    ) -> None:
        self.n_concepts = n_concepts
        self.rank = rank
        self.l1_coef = l1_coef
        self.nuclear_coef = nuclear_coef
        self.p_end = p_end
        self.p_anneal_start = p_anneal_start
        self.n_p_updates = n_p_updates
        self.sparsity_warmup = sparsity_warmup
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.lr_warmup = lr_warmup
        self.lr_decay = lr_decay
        self.grad_clip = grad_clip
        self.normalize = normalize
        self.b_dec_init = b_dec_init
        self.decoder_init = decoder_init
        self.dead_window = dead_window
        self.autocast = autocast
        self.sparse_backend = sparse_backend
        self.log_every = log_every
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.random_state = random_state
        self.init_random_state = init_random_state
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    _sparse_transform = True

    def _validate_variant_params(self, d_in: int | None) -> None:
        name = type(self).__name__
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"{name}: rank must be a positive integer; got {r!r}.")
        if r > self.n_concepts or (d_in is not None and r > d_in):
            raise ValueError(
                f"{name}: rank={r} must not exceed n_concepts={self.n_concepts} or the number of features ({d_in})."
            )
        for attr in ("l1_coef", "nuclear_coef"):
            v = getattr(self, attr)
            if not isinstance(v, numbers.Real) or v < 0:
                raise ValueError(f"{name}: {attr} must be a number >= 0; got {v!r}.")
        if not isinstance(self.p_end, numbers.Real) or not 0 < self.p_end <= 1:
            raise ValueError(f"{name}: p_end must be in (0, 1]; got {self.p_end!r}.")
        n = self.n_p_updates
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name}: n_p_updates must be a positive integer; got {n!r}.")

    def _make_activation(self) -> Activation:
        return ReLUActivation()

    def _make_module(self, d_in: int, init_data: Tensor | None, generator: torch.Generator) -> SparseAutoencoder:
        return LowRankAutoencoder(
            d_in, self.n_concepts, self._make_activation(), int(self.rank), sparse_backend=self.sparse_backend
        )

    # ------------------------------------------------------------------ p-annealing controller
    def _p_values(self) -> np.ndarray:
        return np.linspace(1.0, float(self.p_end), int(self.n_p_updates) + 1)

    def _p_index_at(self, step: int, total: int) -> int:
        start = resolve_steps(self.p_anneal_start, total)
        if step < start or total <= start:
            return 0
        span = (total - start) / int(self.n_p_updates)
        return min(int(self.n_p_updates), int((step - start) / span) + 1) if span > 0 else int(self.n_p_updates)

    def _variant_state(self) -> dict:
        return {"p_index": self._p_index, "lam_scale": self._lam_scale, "queue": self._queue}

    def _load_variant_state(self, state: dict) -> None:
        self._p_index = int(state.get("p_index", 0))
        self._lam_scale = float(state.get("lam_scale", 1.0))
        self._queue = [list(q) for q in state.get("queue", [])]

    def _before_step(self, module: SparseAutoencoder, step: int, total: int) -> None:
        target = self._p_index_at(step, total)
        while self._p_index < target:
            if self._queue:
                q = np.asarray(self._queue, dtype=np.float64)
                cur, nxt = q[:, 0].mean(), q[:, 1].mean()
                if nxt > 0:
                    self._lam_scale *= cur / nxt
            self._p_index += 1
            self._queue = []

    def _lp(self, s: Tensor, p: float) -> Tensor:
        return ((s + self._eps).pow(p) - self._eps**p).sum(-1).mean()

    def _penalties(self, module: SparseAutoencoder, x: Tensor, out: TrainOutput, ctx: dict) -> dict[str, Tensor]:
        ps = self._p_values()
        p = float(ps[self._p_index])
        s = out.codes.to(torch.float32)
        lam = self.l1_coef * self._lam_scale * warmup_factor(ctx["step"], resolve_steps(self.sparsity_warmup, ctx["total"]))
        lp = self._lp(s, p)
        with torch.no_grad():
            p_next = float(ps[min(self._p_index + 1, len(ps) - 1)])
            self._queue = (self._queue + [[float(lp), float(self._lp(s, p_next))]])[-10:]
        u, v = module.lowrank_factors(x)
        nuc = nuclear_norm_lowrank(u.float(), v.float()) / x.shape[0]
        return {"sparsity": lam * lp, "nuclear": self.nuclear_coef * nuc}

    # ------------------------------------------------------------------ inference
    def transform_lowrank(self, X: Any, *, batch_size: int | None = None) -> Any:
        """Dense low-rank latent component ``R = U V`` of ``X`` [n_samples, n_concepts]."""
        batches, kind, in_dev = self._iter_input(X, batch_size)
        self.module_.eval()
        with torch.no_grad():
            out = torch.cat([self.module_.lowrank(xb) for xb in batches])
        return self._out(out, kind, in_dev)
