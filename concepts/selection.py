"""Diverse subset selection with determinantal point processes (DPPs).

A DPP over ``n`` items with a PSD likelihood kernel ``L [n, n]`` gives a subset ``S`` probability
proportional to ``det(L_S)``: subsets of high-quality, mutually dissimilar items are likely. Here the
kernel is the quality x similarity decomposition ``L = diag(q) S diag(q)``, with ``S`` the cosine Gram
matrix of the item vectors (concepts, prompts, image features) and ``q >= 0`` an optional quality per
item (default 1).

Two ways to pick ``k`` items:

- ``method="greedy"``: deterministic greedy MAP, :func:`greedy_map`. Each step adds the item with the
  largest Schur-complement gain ``L_ii - L_iS L_SS^{-1} L_Si`` (equivalently, the largest increase of
  ``log det L_S``), computed with the incremental-Cholesky update of Chen, Zhang & Zhou (NeurIPS 2018,
  "Fast greedy MAP inference for DPPs"): ``O(n k^2)`` time, and rows of ``L`` are computed on demand so
  ``L`` is never formed when selecting from vectors. This is the selection the concept-guided Bayesian
  zero-shot classifier (CGBC) uses for its prompts (there with ``q = 1`` and a ``1e-5`` jitter; here exact).
  Ties go to the lowest index.
- ``method="sample"``: an exact k-DPP sample through ``dppy`` (:func:`kdpp_sample`; spectral algorithm
  of Kulesza & Taskar), reproducible from ``random_state``.

Examples
--------
>>> import numpy as np
>>> from concepts.selection import dpp_select
>>> X = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]])
>>> dpp_select(X, 2, quality=[1.0, 0.9, 0.8]).tolist()   # near-copies 0 and 1 are not picked together
[0, 2]
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["dpp_kernel", "greedy_map", "kdpp_sample", "dpp_select", "log_det"]

RandomState = Union[None, int, np.integer, np.random.RandomState, np.random.Generator]

_RANK_RTOL = 1e-10


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _as_vectors(vectors: Any) -> np.ndarray:
    from .bank import ConceptBank

    if isinstance(vectors, ConceptBank):
        vectors = vectors.vectors
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().to("cpu", torch.float64).numpy()
    if not isinstance(vectors, np.ndarray):
        try:
            vectors = np.asarray(vectors, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"vectors must be a ConceptBank, Tensor or array [n, d]; got {type(vectors).__name__}."
            ) from None
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must have shape [n, d] with n >= 1; got shape {vectors.shape}.")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values; clean them first.")
    return vectors


def _as_quality(quality: Any, n: int) -> np.ndarray | None:
    if quality is None:
        return None
    if isinstance(quality, torch.Tensor):
        quality = quality.detach().cpu().numpy()
    q = np.asarray(quality, dtype=np.float64)
    if q.shape != (n,):
        raise ValueError(f"quality must have shape [{n}] (one value per item); got shape {q.shape}.")
    if not np.isfinite(q).all() or (q < 0).any():
        raise ValueError("quality must be finite and non-negative (it scales the kernel: L = diag(q) S diag(q)).")
    return q


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer; got {type(k).__name__}.")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of items n={n}; choose k <= {n}.")
    return k


def _as_kernel(L: Any) -> np.ndarray:
    if isinstance(L, torch.Tensor):
        L = L.detach().to("cpu", torch.float64).numpy()
    try:
        L = np.asarray(L, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"L must be a square matrix (Tensor or array); got {type(L).__name__}.") from None
    if L.ndim != 2 or L.shape[0] != L.shape[1] or L.shape[0] == 0:
        raise ValueError(f"L must be a non-empty square matrix [n, n]; got shape {L.shape}.")
    if not np.isfinite(L).all():
        raise ValueError("L contains NaN or infinite values.")
    scale = max(float(np.abs(L).max()), 1e-300)
    asym = float(np.abs(L - L.T).max())
    if asym > 1e-8 * scale:
        raise ValueError(
            f"L must be symmetric; max |L - L.T| = {asym:.3g}. Symmetrise it, e.g. (L + L.T) / 2, if the "
            "asymmetry is numerical noise."
        )
    return (L + L.T) / 2


def _eigh_psd(L: np.ndarray, psd_tol: float) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh(L)
    top = max(float(np.abs(vals).max()), 1e-300)
    if vals.min() < -psd_tol * top:
        raise ValueError(
            f"L is not positive semi-definite: its smallest eigenvalue is {vals.min():.3g} (largest "
            f"{vals.max():.3g}). A DPP kernel must be PSD; build it with dpp_kernel(vectors, quality), or clip "
            "negative eigenvalues."
        )
    return np.clip(vals, 0.0, None), vecs


def log_det(L: Any, indices: Any) -> float:
    """``log det L[S, S]`` for the subset ``S = indices`` (``-inf`` if singular).

    Examples
    --------
    >>> import numpy as np
    >>> bool(abs(log_det(np.diag([1.0, 2.0, 3.0]), [1, 2]) - np.log(6.0)) < 1e-12)
    True
    """
    L = _as_kernel(L)
    idx = np.asarray(indices, dtype=int)
    if idx.size == 0:
        return 0.0
    sign, val = np.linalg.slogdet(L[np.ix_(idx, idx)])
    return float(val) if sign > 0 else float("-inf")


# --------------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------------
def dpp_kernel(vectors: Any, quality: Any = None) -> np.ndarray:
    """The quality x similarity DPP kernel ``L = diag(q) S diag(q)``, ``S`` the cosine Gram matrix.

    ``S`` is PSD by construction (a Gram matrix of unit vectors); it is symmetrised exactly and any
    round-off negative eigenvalues are irrelevant to :func:`greedy_map` and clipped by :func:`kdpp_sample`.
    Zero vectors get a zero row.

    Parameters
    ----------
    vectors
        ConceptBank, Tensor or array ``[n, d]``.
    quality
        Optional non-negative quality per item ``[n]``.

    Returns
    -------
    np.ndarray
        float64 ``[n, n]``.

    Examples
    --------
    >>> dpp_kernel([[1.0, 0.0], [1.0, 1.0]], quality=[1.0, 2.0]).round(3)
    array([[1.   , 1.414],
           [1.414, 4.   ]])
    """
    X = _as_vectors(vectors)
    q = _as_quality(quality, X.shape[0])
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    Xn = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
    if q is not None:
        Xn = Xn * q[:, None]
    S = Xn @ Xn.T
    return (S + S.T) / 2


# --------------------------------------------------------------------------------------------------
# greedy MAP (Chen et al. 2018, incremental Cholesky)
# --------------------------------------------------------------------------------------------------
def _greedy(diag: np.ndarray, row: Callable[[int], np.ndarray], k: int, neg_tol: float) -> np.ndarray:
    n = diag.shape[0]
    top = float(diag.max()) if n else 0.0
    tol = _RANK_RTOL * max(top, 1e-300)
    d2 = diag.astype(np.float64).copy()
    C = np.zeros((k, n))
    selected: list[int] = []
    active = np.ones(n, dtype=bool)
    j = int(np.argmax(d2))
    if d2[j] <= tol:
        raise ValueError(
            f"k={k} is larger than the rank of L (0: every item has zero kernel diagonal); nothing can be selected."
        )
    while True:
        selected.append(j)
        active[j] = False
        if len(selected) == k:
            break
        t = len(selected) - 1
        e = (row(j) - C[:t, j] @ C[:t]) / np.sqrt(d2[j])
        C[t] = e
        d2 = d2 - e * e
        cand = np.where(active, d2, -np.inf)
        worst = float(cand[active].min())
        if worst < -neg_tol * max(top, 1e-300):
            bad = int(np.flatnonzero(active)[np.argmin(d2[active])])
            raise ValueError(
                f"L is not positive semi-definite: the Schur complement of item {bad} given the selected items "
                f"{selected} is {worst:.3g} < 0. A DPP kernel must be PSD; build it with dpp_kernel(...)."
            )
        j = int(np.argmax(cand))
        if cand[j] <= tol:
            raise ValueError(
                f"k={k} is larger than the numerical rank of the kernel: after {len(selected)} items every remaining "
                f"item lies in their span (largest Schur complement {max(cand[j], 0.0):.3g}). Choose k <= "
                f"{len(selected)}, or add items / dimensions."
            )
    return np.asarray(selected, dtype=np.int64)


def greedy_map(L: Any, k: int, *, check_psd: bool = True, psd_tol: float = 1e-6) -> np.ndarray:
    """Greedy MAP for a DPP: ``k`` items, each maximising the gain in ``log det L_S``.

    Fast incremental-Cholesky version of Chen et al. (2018): ``O(n k^2)`` after the optional PSD check.
    The result is identical to the naive procedure that recomputes ``log det L_{S+i}`` for every
    candidate ``i`` at every step (ties go to the lowest index).

    Parameters
    ----------
    L
        Symmetric PSD kernel ``[n, n]`` (array or Tensor).
    k
        Number of items, ``1 <= k <= rank(L)``.
    check_psd
        Check PSD with a full eigendecomposition first (``O(n^3)``); without it, a non-PSD kernel is still
        caught when a Schur complement turns negative.
    psd_tol
        Negative eigenvalues (Schur complements) down to ``-psd_tol * max`` count as round-off.

    Returns
    -------
    np.ndarray
        int64 indices ``[k]`` in the order they were picked.

    Raises
    ------
    ValueError
        If ``k`` exceeds ``n`` or the rank of ``L``, or ``L`` is not symmetric PSD.

    Examples
    --------
    >>> import numpy as np
    >>> L = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.5]])
    >>> greedy_map(L, 2).tolist()
    [0, 2]
    """
    L = _as_kernel(L)
    k = _check_k(k, L.shape[0])
    if check_psd:
        _eigh_psd(L, psd_tol)
    diag = np.diag(L).copy()
    if (diag < -psd_tol * max(float(np.abs(diag).max()), 1e-300)).any():
        raise ValueError("L is not positive semi-definite: it has negative diagonal entries.")
    return _greedy(diag, lambda j: L[j], k, psd_tol)


# --------------------------------------------------------------------------------------------------
# exact k-DPP sampling (dppy)
# --------------------------------------------------------------------------------------------------
def _random_state(random_state: RandomState) -> np.random.RandomState:
    if random_state is None:
        return np.random.RandomState()
    if isinstance(random_state, np.random.RandomState):
        return random_state
    if isinstance(random_state, np.random.Generator):
        return np.random.RandomState(int(random_state.integers(0, 2**32 - 1)))
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer seed; got {random_state}.")
        return np.random.RandomState(int(random_state) % (2**32))
    raise TypeError(
        f"random_state must be None, an int seed, a numpy RandomState or Generator; got {type(random_state).__name__}."
    )


def kdpp_sample(L: Any, k: int, random_state: RandomState = None, *, psd_tol: float = 1e-6) -> np.ndarray:
    """An exact sample of ``k`` items from the k-DPP with kernel ``L`` (``P(S) ∝ det L_S``, ``|S| = k``).

    Uses ``dppy.finite_dpps.FiniteDPP('likelihood', L_eig_dec=...).sample_exact_k_dpp`` on the
    eigendecomposition of ``L`` (round-off negative eigenvalues clipped; the spectrum is rescaled, which
    leaves the k-DPP unchanged and avoids overflow). The eigendecomposition costs ``O(n^3)``: for more than a
    few thousand items prefer ``dpp_select(..., method="greedy")``.

    Parameters
    ----------
    L
        Symmetric PSD kernel ``[n, n]``.
    k
        Sample size, ``1 <= k <= rank(L)``.
    random_state
        Seed, ``np.random.RandomState`` or ``np.random.Generator``; the same seed gives the same sample.
        None draws fresh entropy (never the global numpy state).
    psd_tol
        Relative tolerance for negative eigenvalues.

    Returns
    -------
    np.ndarray
        int64 indices ``[k]``, sorted.

    Examples
    --------
    >>> import numpy as np
    >>> kdpp_sample(np.eye(5), 2, random_state=0).shape
    (2,)
    """
    from dppy.finite_dpps import FiniteDPP

    L = _as_kernel(L)
    n = L.shape[0]
    k = _check_k(k, n)
    rng = _random_state(random_state)
    vals, vecs = _eigh_psd(L, psd_tol)
    top = float(vals.max())
    keep = vals > max(top, 1e-300) * max(n * np.finfo(np.float64).eps, _RANK_RTOL)
    rank = int(keep.sum())
    if top <= 0 or k > rank:
        raise ValueError(
            f"k={k} is larger than the rank of L ({rank}); a k-DPP needs k <= rank(L). Choose a smaller k, or "
            "use more items / dimensions."
        )
    dpp = FiniteDPP("likelihood", L_eig_dec=(vals[keep] / top, vecs[:, keep]))
    sample = dpp.sample_exact_k_dpp(size=k, random_state=rng)
    return np.sort(np.asarray(sample, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# one entry point
# --------------------------------------------------------------------------------------------------
def dpp_select(
    vectors: Any,
    k: int,
    *,
    quality: Any = None,
    method: str = "greedy",
    random_state: RandomState = None,
) -> np.ndarray:
    """Pick ``k`` diverse (and, with ``quality``, good) items from their vectors.

    Parameters
    ----------
    vectors
        ConceptBank, Tensor or array ``[n, d]`` (concepts, prompt embeddings, image features).
    k
        Number of items.
    quality
        Optional non-negative quality per item ``[n]``; the kernel is ``diag(q) S diag(q)``.
    method
        ``"greedy"`` (deterministic greedy MAP, :func:`greedy_map`; ``L`` is never formed) or ``"sample"``
        (exact k-DPP sample, :func:`kdpp_sample`).
    random_state
        Seed for ``"sample"`` (ignored by ``"greedy"``).

    Returns
    -------
    np.ndarray
        int64 indices ``[k]`` (greedy: in pick order; sample: sorted). ``bank.select(indices)`` gives the
        sub-bank.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0]])
    >>> sorted(dpp_select(X, 2, method="sample", random_state=0).tolist()) in ([0, 2], [0, 3], [1, 2], [1, 3])
    True
    """
    if method not in ("greedy", "sample"):
        raise ValueError(f"method must be 'greedy' or 'sample'; got {method!r}.")
    X = _as_vectors(vectors)
    n = X.shape[0]
    k = _check_k(k, n)
    q = _as_quality(quality, n)
    if method == "sample":
        return kdpp_sample(dpp_kernel(X, q), k, random_state)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    F = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
    if q is not None:
        F = F * q[:, None]
    diag = np.einsum("ij,ij->i", F, F)
    return _greedy(diag, lambda j: F @ F[j], k, 1e-6)
