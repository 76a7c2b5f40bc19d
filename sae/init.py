"""Data-dependent initialisation: geometric median, input scale, k-means candidate points."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["geometric_median", "expected_norm_scale", "kmeans"]


@torch.no_grad()
def geometric_median(x: Tensor, *, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Geometric median of the rows of ``x`` [n, d] by Weiszfeld's iteration (IRLS).

    Minimises ``sum_i ||x_i - m||``. Starts from the mean; stops when the relative change of
    ``m`` falls below ``tol`` or after ``max_iter`` iterations.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    >>> geometric_median(x).norm() < 1.0   # robust to the outlier, unlike the mean
    tensor(True)
    """
    x = x.to(torch.float64)
    m = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-12)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() <= tol * m.norm().clamp_min(1e-12):
            m = m_new
            break
        m = m_new
    return m.to(torch.float32)


@torch.no_grad()
def expected_norm_scale(x: Tensor) -> float:
    """Scale ``s`` with ``E||s x|| = sqrt(d)`` on the sample ``x`` [n, d] (SAELens' convention)."""
    mean_norm = float(x.to(torch.float64).norm(dim=1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        return 1.0
    return math.sqrt(x.shape[1]) / mean_norm


@torch.no_grad()
def kmeans(x: Tensor, n_clusters: int, *, n_iter: int = 20, generator: torch.Generator | None = None) -> Tensor:
    """Lloyd's k-means with k-means++ seeding; returns centroids [n_clusters, d].

    Empty clusters are re-seeded at the points farthest from their centroid. Deterministic for a
    given ``generator``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.cat([torch.randn(50, 2) * 0.1, torch.randn(50, 2) * 0.1 + 5])
    >>> c = kmeans(x, 2, generator=g)
    >>> sorted(round(v) for v in c[:, 0].tolist())
    [0, 5]
    """
    x = x.to(torch.float32)
    n = x.shape[0]
    if n_clusters > n:
        raise ValueError(
            f"k-means needs at least n_clusters={n_clusters} points, but got {n}. Pass more data "
            "or lower the number of candidates."
        )
    sq = x.pow(2).sum(1)

    def dist2(c: Tensor) -> Tensor:
        return (sq[:, None] - 2 * x @ c.T + c.pow(2).sum(1)[None]).clamp_min(0)

    # k-means++ seeding (one candidate per step, chunked distance updates)
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, n_clusters):
        total = closest.sum()
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(closest / total, 1, generator=generator))
        centers.append(x[idx])
        closest = torch.minimum(closest, (x - x[idx]).pow(2).sum(1))
    c = torch.stack(centers)
    for _ in range(n_iter):
        d2 = dist2(c)
        assign = d2.argmin(1)
        counts = torch.bincount(assign, minlength=n_clusters).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = counts == 0
        new = sums / counts.clamp_min(1)[:, None]
        if bool(empty.any()):
            far = d2.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            new[empty] = x[far]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c
