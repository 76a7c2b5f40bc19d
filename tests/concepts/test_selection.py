"""Diverse selection with DPPs: greedy MAP against brute force and the exhaustive optimum, exact k-DPP
sampling against the k-DPP law det(L_S) / e_k, diversity against uniform sampling, seeds, errors."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from concepts.bank import ConceptBank
from concepts.selection import dpp_kernel, dpp_select, greedy_map, kdpp_sample, log_det


def random_psd(n: int, rank: int, seed: int, quality: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, rank))
    q = rng.uniform(0.5, 2.0, size=n) if quality else None
    return dpp_kernel(X, q)


def brute_force_greedy(L: np.ndarray, k: int) -> list[int]:
    """Naive greedy: at every step recompute log det L_{S+i} for every candidate i."""
    S: list[int] = []
    for _ in range(k):
        best, best_val = -1, -np.inf
        for i in range(L.shape[0]):
            if i in S:
                continue
            val = log_det(L, S + [i])
            if val > best_val + 1e-12:
                best, best_val = i, val
        S.append(best)
    return S


def mean_pairwise_cos(X: np.ndarray, idx: np.ndarray) -> float:
    Xn = X[idx] / np.linalg.norm(X[idx], axis=1, keepdims=True)
    G = Xn @ Xn.T
    k = len(idx)
    return float((G.sum() - k) / (k * (k - 1)))


# ----------------------------------------------------------------------------- kernel
def test_dpp_kernel_is_quality_times_cosine_gram():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 4)) * rng.uniform(0.1, 10, size=(6, 1))
    q = rng.uniform(0, 3, size=6)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(dpp_kernel(X, q), np.diag(q) @ (Xn @ Xn.T) @ np.diag(q), atol=1e-12)
    np.testing.assert_allclose(np.diag(dpp_kernel(X)), 1.0)
    X[2] = 0.0
    L = dpp_kernel(torch.tensor(X))
    assert np.all(L[2] == 0) and np.all(L[:, 2] == 0)
    assert np.linalg.eigvalsh(L).min() > -1e-10


# ----------------------------------------------------------------------------- greedy MAP
@pytest.mark.parametrize("seed", range(6))
def test_greedy_map_equals_brute_force_greedy(seed):
    L = random_psd(12, 8, seed)
    for k in (1, 3, 6, 8):
        assert greedy_map(L, k).tolist() == brute_force_greedy(L, k)


def test_greedy_map_is_close_to_the_exhaustive_optimum():
    gaps = []
    for seed in range(8):
        L = random_psd(10, 6, 100 + seed)
        for k in (2, 3, 4):
            opt = max(log_det(L, list(S)) for S in itertools.combinations(range(10), k))
            got = log_det(L, greedy_map(L, k))
            assert got <= opt + 1e-9
            # the greedy volume is within k! of the optimum (Civril & Magdon-Ismail), det within (k!)^2
            assert got >= opt - 2 * math.log(math.factorial(k))
            gaps.append(opt - got)
    # and in practice far closer: the greedy det is on average within a factor 1.25 of the best
    assert np.mean(gaps) < math.log(1.25)


def test_greedy_map_picks_high_gain_items_in_a_planted_problem():
    # three tight clusters of near-copies plus one singleton: greedy picks one per cluster, then the singleton
    rng = np.random.default_rng(0)
    centres = np.eye(4)
    X = np.concatenate([centres[c] + 0.01 * rng.normal(size=(5, 4)) for c in range(3)] + [centres[3:4]])
    picked = dpp_select(X, 4)
    assert sorted(i // 5 for i in picked[:4]) == [0, 1, 2, 3]


def test_dpp_select_greedy_matches_greedy_map_and_uses_quality():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 8))
    q = rng.uniform(0.2, 2.0, size=30)
    assert dpp_select(X, 7, quality=q).tolist() == greedy_map(dpp_kernel(X, q), 7).tolist()
    # the first pick is the item of highest quality (its diagonal q_i^2 is the largest gain)
    assert dpp_select(X, 1, quality=q)[0] == int(np.argmax(q))
    bank = ConceptBank(torch.tensor(X, dtype=torch.float32))
    idx = dpp_select(bank, 5, quality=torch.tensor(q))
    assert bank.select(idx).n_concepts == 5
    assert idx.dtype == np.int64


# ----------------------------------------------------------------------------- exact k-DPP sampling
def test_kdpp_sample_follows_the_kdpp_law():
    rng = np.random.default_rng(3)
    L = dpp_kernel(rng.normal(size=(5, 3)), rng.uniform(0.5, 1.5, size=5)) * 7.0  # scale must not matter
    subsets = list(itertools.combinations(range(5), 2))
    p = np.array([math.exp(log_det(L, list(S))) for S in subsets])
    p /= p.sum()
    draws = 3000
    counts = {S: 0 for S in subsets}
    state = np.random.RandomState(0)
    for _ in range(draws):
        counts[tuple(kdpp_sample(L, 2, random_state=state).tolist())] += 1
    observed = np.array([counts[S] for S in subsets])
    chi2 = stats.chisquare(observed, p * draws)
    assert chi2.pvalue > 1e-3


def test_kdpp_samples_are_more_diverse_than_uniform_samples():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    X = np.repeat(centres, 8, axis=0) + 0.3 * rng.normal(size=(48, 16))
    L = dpp_kernel(X)
    dpp = [mean_pairwise_cos(X, kdpp_sample(L, 6, random_state=s)) for s in range(100)]
    unif = [mean_pairwise_cos(X, np.random.default_rng(1000 + s).choice(48, 6, replace=False)) for s in range(100)]
    assert np.mean(dpp) < np.mean(unif)
    assert stats.mannwhitneyu(dpp, unif, alternative="less").pvalue < 1e-4
    # the greedy MAP subset is more diverse still than a typical sample
    assert mean_pairwise_cos(X, dpp_select(X, 6)) <= np.median(dpp)


def test_same_seed_same_sample_and_global_state_untouched():
    L = random_psd(20, 10, 0)
    before = np.random.get_state()[1].copy()
    a = kdpp_sample(L, 4, random_state=7)
    b = kdpp_sample(L, 4, random_state=7)
    assert a.tolist() == b.tolist()
    assert len({tuple(kdpp_sample(L, 4, random_state=s)) for s in range(10)}) > 1
    g1 = dpp_select(np.eye(20)[:, :10] + 0.1, 3, method="sample", random_state=np.random.default_rng(5))
    g2 = dpp_select(np.eye(20)[:, :10] + 0.1, 3, method="sample", random_state=np.random.default_rng(5))
    assert g1.tolist() == g2.tolist() and list(g1) == sorted(g1)
    kdpp_sample(L, 4)  # fresh entropy, must not draw from numpy's global state
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# ----------------------------------------------------------------------------- errors
def test_k_larger_than_rank_raises():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="rank"):
        dpp_select(X, 4)
    with pytest.raises(ValueError, match="rank"):
        dpp_select(X, 4, method="sample", random_state=0)
    with pytest.raises(ValueError, match="rank"):
        greedy_map(dpp_kernel(X), 5)
    with pytest.raises(ValueError, match="rank of L"):
        greedy_map(np.zeros((3, 3)), 1)
    assert len(dpp_select(X, 3)) == 3


def test_non_psd_and_malformed_kernels_raise():
    bad = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues -1, 3
    with pytest.raises(ValueError, match="not positive semi-definite"):
        greedy_map(bad, 2)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        greedy_map(bad, 2, check_psd=False)  # caught by the negative Schur complement
    with pytest.raises(ValueError, match="not positive semi-definite"):
        kdpp_sample(bad, 1, random_state=0)
    with pytest.raises(ValueError, match="negative diagonal"):
        greedy_map(np.diag([1.0, -1.0]), 1, check_psd=False)
    with pytest.raises(ValueError, match="symmetric"):
        greedy_map(np.array([[1.0, 0.5], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="square"):
        kdpp_sample(np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match="NaN"):
        greedy_map(np.full((2, 2), np.nan), 1)
    with pytest.raises(TypeError, match="square matrix"):
        greedy_map("not a kernel", 1)


def test_argument_errors():
    X = np.random.default_rng(0).normal(size=(5, 5))
    with pytest.raises(ValueError, match="larger than the number of items"):
        dpp_select(X, 6)
    with pytest.raises(ValueError, match="at least 1"):
        dpp_select(X, 0)
    with pytest.raises(TypeError, match="k must be an integer"):
        dpp_select(X, 2.0)
    with pytest.raises(ValueError, match="method"):
        dpp_select(X, 2, method="mcmc")
    with pytest.raises(ValueError, match="non-negative"):
        dpp_select(X, 2, quality=[1, 1, -1, 1, 1])
    with pytest.raises(ValueError, match=r"quality must have shape \[5\]"):
        dpp_select(X, 2, quality=[1, 1])
    with pytest.raises(ValueError, match=r"shape \[n, d\]"):
        dpp_select(np.ones(5), 2)
    with pytest.raises(ValueError, match="NaN"):
        dpp_select(np.full((3, 2), np.nan), 1)
    with pytest.raises(TypeError, match="ConceptBank, Tensor or array"):
        dpp_select(object(), 1)
    with pytest.raises(TypeError, match="random_state"):
        kdpp_sample(np.eye(3), 1, random_state="seed")
    with pytest.raises(ValueError, match="non-negative integer seed"):
        kdpp_sample(np.eye(3), 1, random_state=-1)
