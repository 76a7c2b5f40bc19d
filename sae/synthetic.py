"""Synthetic sparse-dictionary data with known atoms (for recovery tests and benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SyntheticDictionaryData", "sparse_dictionary_data"]


@dataclass(frozen=True)
class SyntheticDictionaryData:
    """Samples ``X`` [n, d] built from ground-truth ``atoms`` [n_atoms, d] with ``codes`` [n, n_atoms]."""

    X: Tensor
    atoms: Tensor
    codes: Tensor | None


def sparse_dictionary_data(
    n: int = 65_536,
    d: int = 512,
    n_atoms: int = 2_048,
    k: int = 8,
    *,
    noise: float = 0.01,
    offset: float = 0.0,
    seed: int = 0,
    chunk: int = 8_192,
    return_codes: bool = False,
) -> SyntheticDictionaryData:
    """``x = sum_{j=1..k} c_j a_{i_j} + offset_vec + noise``.

    ``a_i`` are unit-norm Gaussian atoms, the ``k`` distinct atoms ``i_j`` of a sample are
    uniform, ``c_j ~ U(0.5, 1.5)`` and the noise is ``N(0, noise^2)`` per coordinate. With
    ``offset = 0`` the random stream matches ``shared/bench/overcomplete_topk.py`` (the peer
    benchmark), so both libraries see identical data. ``offset > 0`` adds a fixed random vector of
    that norm to every sample (a large per-feature mean).

    Examples
    --------
    >>> data = sparse_dictionary_data(n=100, d=8, n_atoms=16, k=2, seed=0)
    >>> data.X.shape, data.atoms.shape
    (torch.Size([100, 8]), torch.Size([16, 8]))
    """
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    xs, cs = [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        idx = torch.rand(m, n_atoms, generator=g).topk(k, dim=1).indices
        coef = 0.5 + torch.rand(m, k, generator=g)
        x = torch.einsum("mk,mkd->md", coef, atoms[idx])
        x = x + noise * torch.randn(m, d, generator=g)
        xs.append(x)
        if return_codes:
            cs.append(torch.zeros(m, n_atoms).scatter_(1, idx, coef))
    X = torch.cat(xs).float().contiguous()
    if offset:
        shift = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1))
        X = X + offset * shift / shift.norm()
    return SyntheticDictionaryData(X, atoms, torch.cat(cs) if return_codes else None)
