"""Variant behaviour on synthetic data with known atoms: recovery, thresholds, prefixes, hulls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sae import ArchetypalSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, StructuredSAE, TopKSAE
from sae.metrics import fvu, ground_truth_recovery, l0
from sae.structured import nuclear_norm_lowrank

COMMON = dict(n_concepts=64, batch_size=128, n_epochs=10, random_state=0)

# (estimator, minimum fraction of the 48 true atoms recovered at cos >= 0.9, minimum Hungarian MCC).
# 160 steps on 2,048 samples; the margins below the measured values are about 0.1.
RECOVERY = {
    "topk": (lambda: TopKSAE(top_k=3, lr=2e-2, **COMMON), 0.75, 0.9),
    "batchtopk": (lambda: BatchTopKSAE(top_k=3, lr=2e-2, **COMMON), 0.75, 0.9),
    "matryoshka": (lambda: MatryoshkaSAE(top_k=3, lr=2e-2, widths=[16, 32], **COMMON), 0.45, 0.75),
    "jumprelu": (lambda: JumpReLUSAE(target_l0=3, l0_coef=10.0, init_threshold=1.0, bandwidth=0.2, **COMMON), 0.8, 0.9),
    "relu": (lambda: ReLUSAE(l1_coef=3.0, **COMMON), 0.85, 0.9),
    "archetypal": (lambda: ArchetypalSAE(top_k=3, **COMMON), 0.9, 0.95),
    "structured": (lambda: StructuredSAE(rank=2, l1_coef=1.0, **COMMON), 0.5, 0.8),
}


@pytest.fixture(scope="module")
def recovered(small_data):
    X = small_data.X[:2048]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test thread fixture
    try:
        return {name: make().fit(X) for name, (make, _, _) in RECOVERY.items()}
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("name", sorted(RECOVERY))
def test_variant_recovers_ground_truth_atoms(name, recovered, small_data):
    est = recovered[name]
    _, min_rec, min_mcc = RECOVERY[name]
    rec = ground_truth_recovery(est.dictionary_, small_data.atoms)
    assert rec["recovery"] >= min_rec, rec
    assert rec["mcc"] >= min_mcc, rec
    assert est.score(small_data.X[2048:]) > 0.7  # held-out explained variance


def test_sparse_transform_equals_dense_and_respects_k(recovered, small_data):
    X = small_data.X[2048:]
    est = recovered["topk"]
    sp = est.transform(X, sparse=True)
    assert sp.indices.shape[1] <= 3
    torch.testing.assert_close(sp.to_dense(64), est.transform(X))
    assert l0(sp) <= 3.0


def test_batchtopk_threshold_is_calibrated_and_batch_independent(recovered, small_data):
    est = recovered["batchtopk"]
    assert est.calibration_l0_ == pytest.approx(3.0, abs=0.01)
    assert est.threshold_ > 0
    X = small_data.X[2048:2148]
    batch = est.transform(X)
    single = torch.cat([est.transform(X[i : i + 1]) for i in range(len(X))])
    torch.testing.assert_close(single, batch)
    # held-out L0 is close to k (the train/inference gap is small on i.i.d. data)
    assert l0(est.transform(small_data.X[2048:])) == pytest.approx(3.0, rel=0.2)
    # the threshold rule: a code is non-zero iff its pre-activation exceeds the stored threshold
    pre = est.module_.pre_activations(X)
    np.testing.assert_array_equal((batch > 0).numpy(), (pre > est.threshold_).numpy())


def test_jumprelu_target_l0_controller_steers_sparsity(small_data):
    X = small_data.X[:2048]
    lo = JumpReLUSAE(target_l0=2, init_threshold=0.5, bandwidth=0.1, l0_coef=3.0, **COMMON).fit(X)
    hi = JumpReLUSAE(target_l0=8, init_threshold=0.5, bandwidth=0.1, l0_coef=3.0, **COMMON).fit(X)
    l_lo, l_hi = l0(lo.transform(X)), l0(hi.transform(X))
    assert l_lo < l_hi
    assert abs(l_lo - 2) < abs(l_lo - 8) and abs(l_hi - 8) < abs(l_hi - 2)


@pytest.mark.parametrize("mode", ["step", "tanh"])
def test_jumprelu_sparsity_coefficient_reduces_l0(mode, small_data):
    X = small_data.X[:1024]
    kw = dict(sparsity_loss=mode, init_threshold=0.5, bandwidth=0.1, **COMMON)
    weak = JumpReLUSAE(l0_coef=0.001, **kw).fit(X)
    strong = JumpReLUSAE(l0_coef=1.0, **kw).fit(X)
    assert l0(strong.transform(X)) < l0(weak.transform(X))
    # the thresholds are learned (moved away from their initial value)
    assert float((strong.module_.activation.threshold.detach() - 0.5 / strong.normalization_scale_).abs().max()) > 1e-3


def test_relu_l1_coefficient_trades_sparsity_for_reconstruction(small_data):
    X = small_data.X[:1024]
    weak = ReLUSAE(l1_coef=0.01, **COMMON).fit(X)
    strong = ReLUSAE(l1_coef=1.0, **COMMON).fit(X)
    assert l0(strong.transform(X)) < l0(weak.transform(X))
    assert strong.score(X) < weak.score(X)


def test_matryoshka_prefixes_reconstruct_better_than_batchtopk_prefixes(recovered, small_data):
    X = small_data.X[2048:]

    def prefix_fvu(est, w):
        z = est.transform(X)
        z[:, w:] = 0
        return fvu(X, est.inverse_transform(z))

    mat, btk = recovered["matryoshka"], recovered["batchtopk"]
    assert prefix_fvu(mat, 16) < prefix_fvu(btk, 16) - 0.05


def test_archetypal_atoms_stay_in_the_relaxed_hull(recovered):
    est = recovered["archetypal"]
    d = est.module_.dictionary
    w = d.W.detach()
    assert float(w.min()) >= 0
    torch.testing.assert_close(w.sum(1), torch.ones(64), rtol=1e-5, atol=1e-5)
    assert float(d.Lambda.detach().norm(dim=1).max()) <= 1.0 + 1e-5
    torch.testing.assert_close(est.dictionary_, ((w @ d.C + d.Lambda) * d.log_scale.exp()).detach())


def test_archetypal_sparse_support_and_fused_export(small_data, tmp_path):
    X = small_data.X[:1024]
    est = ArchetypalSAE(n_concepts=64, top_k=3, n_candidates=32, mixture_support=4, batch_size=128,
                        n_epochs=3, random_state=0).fit(X)
    assert est.module_.dictionary.W.shape == (64, 4)
    assert est.module_.dictionary.support_idx.shape == (64, 4)
    fused = est.to_fused()
    assert type(fused) is TopKSAE
    torch.testing.assert_close(fused.reconstruct(X[:50]), est.reconstruct(X[:50]), rtol=1e-5, atol=1e-5)
    from sae import load

    path = est.save(tmp_path / "fused", fused=True)
    loaded = load(path)
    assert type(loaded) is TopKSAE
    torch.testing.assert_close(loaded.transform(X[:20]), est.transform(X[:20]))
    full = est.save(tmp_path / "full")
    assert (path / "weights.safetensors").stat().st_size < (full / "weights.safetensors").stat().st_size
    assert type(load(full)) is ArchetypalSAE


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu", "relu"])
def test_archetypal_works_under_other_activations(activation, small_data):
    X = small_data.X[:1024]
    est = ArchetypalSAE(n_concepts=64, activation=activation, top_k=3, sparsity_coef=0.1, batch_size=128,
                        n_epochs=3, random_state=0).fit(X)
    assert est.score(X) > 0.5
    assert type(est.to_fused()).__name__.lower().startswith(activation.replace("relu", "relu")[:4])


def test_archetypal_candidates_depend_on_the_init_seed(small_data):
    X = small_data.X[:512]
    a = ArchetypalSAE(n_concepts=32, top_k=3, n_candidates=32, random_state=0)
    b = ArchetypalSAE(n_concepts=32, top_k=3, n_candidates=32, random_state=1)
    assert not torch.allclose(a.initial_dictionary(X), b.initial_dictionary(X))
    torch.testing.assert_close(a.initial_dictionary(X), a.initial_dictionary(X))


def test_nuclear_norm_lowrank_is_exact_and_differentiable():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    ours = nuclear_norm_lowrank(u, v)
    ref = torch.linalg.matrix_norm(u @ v, ord="nuc")
    torch.testing.assert_close(ours, ref)
    gu, gv = torch.autograd.grad(ours, (u, v))
    ru, rv = torch.autograd.grad(torch.linalg.matrix_norm(u @ v, ord="nuc"), (u, v))
    torch.testing.assert_close(gu, ru)
    torch.testing.assert_close(gv, rv)


def test_structured_nuclear_penalty_shrinks_the_lowrank_part(small_data):
    X = small_data.X[:1024]
    kw = dict(rank=4, l1_coef=0.1, **COMMON)
    free = StructuredSAE(nuclear_coef=0.0, **kw).fit(X)
    tight = StructuredSAE(nuclear_coef=50.0, **kw).fit(X)
    r_free = float(torch.linalg.matrix_norm(free.transform_lowrank(X), ord="nuc"))
    r_tight = float(torch.linalg.matrix_norm(tight.transform_lowrank(X), ord="nuc"))
    assert r_tight < 0.5 * r_free
    # the p-annealing schedule moved p to p_end and rescaled lambda
    assert free._p_index == free.n_p_updates
    assert free._lam_scale != 1.0
    # reconstruct uses sparse + low-rank parts
    z, r = free.transform(X[:5]), free.transform_lowrank(X[:5])
    torch.testing.assert_close(free.reconstruct(X[:5]), free.inverse_transform(z + r), rtol=1e-5, atol=1e-5)
