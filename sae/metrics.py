"""SAE metrics: reconstruction, sparsity, dictionary geometry, ground-truth recovery, AUROC.

Every formula here is pinned by a test in ``tests/sae/test_metrics.py`` against an independent
computation. Protocols that train or run models (seed stability, the supervised-probe upper
bound, downstream recovery) live in :mod:`sae.evaluation`.

Conventions: ``X`` and ``X_hat`` are [n, d]; codes are dense [n, n_concepts] or
:class:`~sae.sparse.SparseCodes`; dictionaries are [n_atoms, d] (rows are atoms).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata
from torch import Tensor

from .sparse import SparseCodes

__all__ = [
    "ReconstructionAccumulator",
    "fvu",
    "explained_variance",
    "l0",
    "feature_density",
    "dead_fraction",
    "density_histogram",
    "shrinkage",
    "relative_reconstruction_bias",
    "cosine_similarity",
    "decoder_collinearity",
    "cosine_matrix",
    "hungarian_mcc",
    "ground_truth_recovery",
    "auroc_per_latent",
    "energy_of_codes",
]


def _t(x: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _dense_codes(codes: Any, n_concepts: int | None = None) -> Tensor:
    if isinstance(codes, SparseCodes):
        if n_concepts is None:
            n_concepts = int(codes.indices.max()) + 1 if codes.indices.numel() else 0
        return codes.to_dense(n_concepts)
    return _t(codes, torch.float32)


class ReconstructionAccumulator:
    """Streams ``FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over many batches.

    The mean is per feature and over the *whole* set. The denominator is accumulated with Chan's
    parallel update of per-feature means and sums of squared deviations in float64, so large
    per-feature offsets do not cancel catastrophically.

    Examples
    --------
    >>> import torch
    >>> acc = ReconstructionAccumulator()
    >>> x = torch.tensor([[0.0, 10.0], [2.0, 12.0]])
    >>> acc.update(x, x + 0.5)
    >>> acc.fvu()   # 4 * 0.25 / (2 * 1 + 2 * 1)
    0.25
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.err = 0.0

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x = _t(x)
        x_hat = _t(x_hat)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        m2b = (x - mb).pow(2).sum(0)
        self.err += float((x - x_hat).pow(2).sum())
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n
        delta = mb - self.mean
        tot = n + nb
        self.mean = self.mean + delta * (nb / tot)
        self.m2 = self.m2 + m2b + delta.pow(2) * (n * nb / tot)
        self.n = tot

    def total_variance(self) -> float:
        """``sum_i ||x_i - mean||^2`` over everything seen."""
        return float(self.m2.sum()) if self.m2 is not None else 0.0

    def fvu(self) -> float:
        tv = self.total_variance()
        return self.err / tv if tv > 0 else float("nan")


def fvu(X: Any, X_hat: Any) -> float:
    """Fraction of variance unexplained (a.k.a. NMSE).

    ``FVU = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean||^2`` with the per-feature mean over
    the whole set, numerator and denominator summed over all samples before dividing.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[1.0, 100.0], [3.0, 104.0]])
    >>> round(fvu(x, x.mean(0).expand_as(x)), 6)
    1.0
    """
    acc = ReconstructionAccumulator()
    acc.update(_t(X), _t(X_hat))
    return acc.fvu()


def explained_variance(X: Any, X_hat: Any) -> float:
    """``1 - FVU`` (see :func:`fvu`)."""
    return 1.0 - fvu(X, X_hat)


def l0(codes: Any) -> float:
    """Mean number of non-zero codes per sample.

    Examples
    --------
    >>> l0([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    1.5
    """
    if isinstance(codes, SparseCodes):
        return float((codes.values != 0).sum(1).to(torch.float64).mean())
    return float((_t(codes) != 0).sum(1).to(torch.float64).mean())


def feature_density(codes: Any, n_concepts: int | None = None) -> Tensor:
    """Per-latent firing frequency (fraction of samples with a non-zero code), [n_concepts]."""
    z = _dense_codes(codes, n_concepts)
    return (z != 0).to(torch.float64).mean(0)


def dead_fraction(codes: Any, window: int | None = None, n_concepts: int | None = None) -> float:
    """Fraction of latents that never fire over the last ``window`` samples (all if ``None``).

    Examples
    --------
    >>> dead_fraction([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    0.3333333333333333
    """
    z = _dense_codes(codes, n_concepts)
    if window is not None:
        z = z[-int(window):]
    return float(((z != 0).sum(0) == 0).to(torch.float64).mean())


def density_histogram(codes: Any, bins: int | Any = 20, n_concepts: int | None = None) -> pd.DataFrame:
    """Histogram of log10 feature densities; dead latents are counted in a separate row.

    Returns
    -------
    DataFrame with columns ``left``, ``right`` (log10 density edges) and ``count``; the last row
    has ``left = right = -inf`` and counts the latents that never fire.
    """
    dens = feature_density(codes, n_concepts).numpy()
    alive = dens[dens > 0]
    logd = np.log10(alive) if alive.size else np.zeros(0)
    if isinstance(bins, int) and logd.size:
        lo = min(float(logd.min()), -1e-9)
        counts, edges = np.histogram(logd, bins=bins, range=(lo, 0.0))
    elif logd.size:
        counts, edges = np.histogram(logd, bins=bins)
    else:
        counts, edges = np.zeros(0, dtype=int), np.zeros(1)
    df = pd.DataFrame({"left": edges[:-1], "right": edges[1:], "count": counts})
    dead = pd.DataFrame({"left": [-np.inf], "right": [-np.inf], "count": [int((dens == 0).sum())]})
    return pd.concat([df, dead], ignore_index=True)


def shrinkage(X: Any, X_hat: Any) -> float:
    """Mean per-sample norm ratio ``||x_hat|| / ||x||`` (< 1: the SAE shrinks its outputs)."""
    x, xh = _t(X), _t(X_hat)
    return float((xh.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).mean())


def relative_reconstruction_bias(X: Any, X_hat: Any) -> float:
    """``E||x_hat||^2 / E<x, x_hat>`` (Wright & Sharkey); 1 for an unbiased reconstruction.

    It is the factor ``gamma`` minimising ``E||x - x_hat / gamma||^2``.
    """
    x, xh = _t(X), _t(X_hat)
    return float(xh.pow(2).sum(1).mean() / (x * xh).sum(1).mean())


def cosine_similarity(X: Any, X_hat: Any) -> float:
    """Mean cosine between each input and its reconstruction."""
    x, xh = _t(X), _t(X_hat)
    return float(torch.nn.functional.cosine_similarity(x, xh, dim=1).mean())


def cosine_matrix(A: Any, B: Any) -> Tensor:
    """Cosine similarities between the rows of ``A`` [m, d] and ``B`` [n, d], [m, n]."""
    a = torch.nn.functional.normalize(_t(A), dim=1)
    b = torch.nn.functional.normalize(_t(B), dim=1)
    return a @ b.T


def decoder_collinearity(D: Any, reduce: str = "max") -> float:
    """Largest off-diagonal ``|cos|`` between atoms (``reduce="max"``) or the mean over atoms of
    each atom's largest ``|cos|`` with another atom (``reduce="mean_max"``)."""
    c = cosine_matrix(D, D).abs()
    c.fill_diagonal_(0.0)
    per_atom = c.max(1).values
    if reduce == "max":
        return float(per_atom.max())
    if reduce == "mean_max":
        return float(per_atom.mean())
    raise ValueError(f"reduce must be 'max' or 'mean_max'; got {reduce!r}.")


def hungarian_mcc(D1: Any, D2: Any) -> float:
    """Mean ``|cos|`` over the optimal one-to-one matching of the atoms of ``D1`` and ``D2``.

    The matching (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) maximises the
    summed ``|cos|``; with unequal sizes ``min(n1, n2)`` pairs are matched. This is the "MCC" of
    O'Neill et al. and SAELens' synthetic benchmark.
    """
    c = cosine_matrix(D1, D2).abs().numpy()
    r, col = linear_sum_assignment(-c)
    return float(c[r, col].mean())


def ground_truth_recovery(D_learned: Any, D_true: Any, threshold: float = 0.9) -> dict[str, float]:
    """How well a learned dictionary recovers known atoms.

    Returns
    -------
    dict with
        ``recovery``: fraction of true atoms whose best (signed) cosine with a learned atom is
        ``>= threshold``; ``mean_best_cos``: mean of those best cosines; ``mcc``:
        :func:`hungarian_mcc` (one-to-one, ``|cos|``).
    """
    c = cosine_matrix(D_true, D_learned)
    best = c.max(1).values
    return {
        "recovery": float((best >= threshold).to(torch.float64).mean()),
        "mean_best_cos": float(best.mean()),
        "mcc": hungarian_mcc(D_true, D_learned),
    }


def auroc_per_latent(codes: Any, labels: Any) -> np.ndarray:
    """AUROC of every latent as a score for a binary label, [n_concepts].

    Mann-Whitney form with average ranks for ties: ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``
    where ``R_pos`` is the rank sum of the positives. Constant latents score 0.5.
    """
    z = _dense_codes(codes).numpy() if not isinstance(codes, np.ndarray) else np.asarray(codes, dtype=np.float64)
    y = np.asarray(labels).astype(bool).ravel()
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"codes have {z.shape[0]} rows but labels have {y.shape[0]}; they must match.")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels must contain both positive and negative samples to compute an AUROC.")
    ranks = rankdata(z, axis=0, method="average")
    r_pos = ranks[y].sum(0)
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def energy_of_codes(codes: Any, D: Any) -> Tensor:
    """Concept energy ``||E[z_i] D_i||`` per concept, [n_concepts]."""
    d = _t(D)
    z = _dense_codes(codes, d.shape[0]).to(torch.float64)
    return (z.mean(0)[:, None] * d).norm(dim=1)
