"""Each metric formula pinned against an independent computation or a closed form."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import roc_auc_score

from sae import metrics as M
from sae.sparse import SparseCodes


def test_fvu_uses_per_feature_means_over_the_whole_set_with_large_offsets():
    rng = np.random.default_rng(0)
    n, d = 4000, 6
    offsets = np.array([1e4, -3e4, 5e3, 0.0, 2e4, -1e3])  # large per-feature means
    x = rng.normal(size=(n, d)) * np.array([1.0, 2.0, 0.5, 3.0, 1.0, 0.1]) + offsets
    x_hat = x + rng.normal(size=(n, d)) * 0.3
    ref = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()  # float64, per-feature mean
    xt, xht = torch.tensor(x, dtype=torch.float32), torch.tensor(x_hat, dtype=torch.float32)
    assert M.fvu(xt, xht) == pytest.approx(ref, rel=2e-3)
    # streaming over uneven batches gives the same number as the whole set
    acc = M.ReconstructionAccumulator()
    for s in np.split(np.arange(n), [7, 1000, 1001, 2500]):
        acc.update(xt[s], xht[s])
    assert acc.fvu() == pytest.approx(ref, rel=2e-3)
    # the anchors' mistakes give very different numbers here
    global_scalar_mean = ((x - x_hat) ** 2).sum() / ((x - x.mean()) ** 2).sum()
    about_zero = ((x - x_hat) ** 2).sum() / (x**2).sum()
    assert abs(global_scalar_mean - ref) > 0.5 * ref and abs(about_zero - ref) > 0.5 * ref
    # averaging per-batch FVUs (batch means) is also wrong when batches differ
    assert M.explained_variance(xt, xht) == pytest.approx(1 - ref, abs=1e-3)


def test_fvu_closed_forms():
    x = torch.randn(100, 4, dtype=torch.float64) + 7
    assert M.fvu(x, x) == 0.0
    assert M.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    assert M.fvu(x, x + 1.0) == pytest.approx(100 * 4 / float(((x - x.mean(0)) ** 2).sum()))


def test_l0_dense_and_sparse():
    z = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    assert M.l0(z) == pytest.approx(1.0)
    sc = SparseCodes(torch.tensor([[1, 2], [2, 0], [0, 0]]), torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]))
    assert M.l0(sc) == pytest.approx(1.0)


def test_dead_fraction_over_a_window_and_density():
    z = torch.zeros(10, 4)
    z[0, 0] = 1.0  # latent 0 fires only in the first sample
    z[:, 1] = 1.0  # always
    z[9, 2] = 2.0  # only in the last sample
    assert M.dead_fraction(z) == pytest.approx(1 / 4)  # latent 3
    assert M.dead_fraction(z, window=5) == pytest.approx(2 / 4)  # latents 0 and 3
    np.testing.assert_allclose(M.feature_density(z).numpy(), [0.1, 1.0, 0.1, 0.0])
    h = M.density_histogram(z, bins=4)
    assert h["count"].iloc[-1] == 1 and np.isneginf(h["left"].iloc[-1])
    assert h["count"].iloc[:-1].sum() == 3
    # log10 densities -1, 0, -1 fall in the first and last bins of [-1, 0]
    assert h["count"].iloc[0] == 2 and h["count"].iloc[-2] == 1


def test_shrinkage_bias_and_cosine_closed_forms():
    x = torch.randn(50, 8, dtype=torch.float64)
    assert M.shrinkage(x, 0.7 * x) == pytest.approx(0.7)
    assert M.relative_reconstruction_bias(x, 0.7 * x) == pytest.approx(0.7)
    assert M.cosine_similarity(x, 3 * x) == pytest.approx(1.0)
    assert M.cosine_similarity(x, -x) == pytest.approx(-1.0)


def test_decoder_collinearity_known_angles():
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]], dtype=torch.float64)
    assert M.decoder_collinearity(d) == pytest.approx(np.sqrt(0.5))
    assert M.decoder_collinearity(d[:2]) == pytest.approx(0.0)
    assert M.decoder_collinearity(d, reduce="mean_max") == pytest.approx(np.sqrt(0.5))
    with pytest.raises(ValueError, match="reduce must be 'max' or 'mean_max'"):
        M.decoder_collinearity(d, reduce="min")


def test_hungarian_mcc_and_recovery():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=1)
    perm = torch.randperm(20, generator=g)
    signs = torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0)[:, None]
    assert M.hungarian_mcc(a, a[perm] * signs * 3.0) == pytest.approx(1.0)
    # against scipy on an arbitrary pair
    b = torch.randn(25, 16, generator=g)
    c = (torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T).abs().numpy()
    r, col = linear_sum_assignment(-c)
    assert M.hungarian_mcc(a, b) == pytest.approx(c[r, col].mean())
    # recovery: rotate half of the atoms to cosine 0.8 with their originals
    learned = a.clone()
    orth = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=1)
    orth = torch.nn.functional.normalize(orth - (orth * a).sum(1, keepdim=True) * a, dim=1)
    learned[:10] = 0.8 * a[:10] + 0.6 * orth[:10]
    rec = M.ground_truth_recovery(learned, a, threshold=0.9)
    assert rec["recovery"] == pytest.approx(0.5)
    assert rec["mean_best_cos"] == pytest.approx((10 * 1.0 + 10 * 0.8) / 20, abs=1e-6)
    # sign matters for recovery (codes are non-negative) but not for MCC
    assert M.ground_truth_recovery(-a, a)["recovery"] == 0.0
    assert M.ground_truth_recovery(-a, a)["mcc"] == pytest.approx(1.0)


def test_auroc_per_latent_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    z = np.stack([y + rng.normal(size=300), np.round(rng.random(300) * 3), np.zeros(300), -1.0 * y], axis=1)
    got = M.auroc_per_latent(z, y)
    ref = [roc_auc_score(y, z[:, j]) for j in range(4)]
    np.testing.assert_allclose(got, ref)
    assert got[2] == 0.5
    with pytest.raises(ValueError, match="both positive and negative"):
        M.auroc_per_latent(z, np.ones(300))
    with pytest.raises(ValueError, match="codes have 300 rows but labels have 3"):
        M.auroc_per_latent(z, [1, 0, 1])


def test_energy_of_codes_closed_form():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    d = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    np.testing.assert_allclose(M.energy_of_codes(z, d).numpy(), [2.0 * 5.0, 1.0 * 1.0])
