"""Training ingredients: schedules, initialisation, AuxK, decoder constraint, folding, autocast."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sae_testing import make_tiny

from sae import TopKSAE
from sae.init import expected_norm_scale, geometric_median, kmeans
from sae.modules import (
    BatchTopKActivation,
    FreeDictionary,
    JumpReLUActivation,
    ReLUActivation,
    SparseAutoencoder,
    TopKActivation,
)
from sae.training import DeadLatentTracker, annealed_k, auxk_loss, lr_factor, resolve_steps, warmup_factor


def test_schedules_closed_forms():
    assert [lr_factor(s, 10, 2, 0) for s in range(3)] == [0.5, 1.0, 1.0]
    assert [lr_factor(s, 10, 0, 4) for s in range(5, 10)] == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert warmup_factor(0, 4) == 0.25 and warmup_factor(10, 4) == 1.0 and warmup_factor(0, 0) == 1.0
    assert [annealed_k(s, 4, 12, 4) for s in range(6)] == [12, 10, 8, 6, 4, 4]
    assert resolve_steps(0.25, 40) == 10 and resolve_steps(7, 40) == 7


def test_geometric_median_matches_numerical_minimiser():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    x[:5] += 50.0  # outliers pull the mean, not the median
    m = geometric_median(x, max_iter=500, tol=1e-10).double()
    ref = minimize(lambda v: np.linalg.norm(x.numpy() - v, axis=1).sum(), x.mean(0).numpy(), method="Nelder-Mead",
                   options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000}).x
    np.testing.assert_allclose(m.numpy(), ref, atol=1e-3)
    assert m.norm() < x.mean(0).norm()


def test_expected_norm_scale_and_kmeans():
    x = torch.randn(200, 16) * 5
    s = expected_norm_scale(x)
    assert float((x * s).norm(dim=1).mean()) == pytest.approx(4.0, rel=1e-5)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(40, 2, generator=torch.Generator().manual_seed(i)) for i, c in enumerate(centers)])
    c = kmeans(pts, 3, generator=torch.Generator().manual_seed(0))
    d = torch.cdist(c, centers)
    assert float(d.min(1).values.max()) < 0.2
    with pytest.raises(ValueError, match="k-means needs at least n_clusters=500 points, but got 120"):
        kmeans(pts, 500)


def test_init_encoder_is_decoder_transpose_and_bias_is_geometric_median(tiny_data):
    est = make_tiny("topk")
    head = tiny_data.X
    m = est._init_module(16, head, 0, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(m.W_enc, m.dictionary.W_dec)
    torch.testing.assert_close(m.dictionary.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(m.b_dec, geometric_median(head))
    assert float(m.b_enc.detach().abs().max()) == 0.0


def test_unit_norm_decoder_and_parallel_gradient_removal():
    d = FreeDictionary(4, 3)
    with torch.no_grad():
        d.W_dec.copy_(torch.nn.functional.normalize(torch.randn(4, 3), dim=1))
    d.W_dec.grad = torch.randn(4, 3)
    d.remove_parallel_grad_()
    assert float((d.W_dec.grad * d.W_dec.detach()).sum(1).abs().max()) < 1e-6
    with torch.no_grad():
        d.W_dec.mul_(3.0)
    d.project_()
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(4))


def test_fitted_topk_dictionary_has_unit_atoms(fitted_tiny):
    for name in ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "structured"):
        torch.testing.assert_close(fitted_tiny[name].dictionary_.norm(dim=1), torch.ones(32), msg=name)


def _module(act):
    g = torch.Generator().manual_seed(0)
    m = SparseAutoencoder(6, 10, act)
    m.reset_parameters(g)
    with torch.no_grad():
        m.b_dec.copy_(torch.randn(6, generator=g))
        m.b_enc.copy_(0.3 * torch.randn(10, generator=g))
        m.W_enc.add_(0.2 * torch.randn(10, 6, generator=g))
    return m.eval()


@pytest.mark.parametrize("act", [
    lambda: TopKActivation(3), lambda: ReLUActivation(),
    lambda: JumpReLUActivation(10, init_threshold=0.2), lambda: BatchTopKActivation(3, 10),
], ids=["topk", "relu", "jumprelu", "batchtopk"])
def test_input_scale_folding_is_exact(act):
    """A model trained on s*x, folded, reproduces (x_hat / s) on raw x with codes / s."""
    m = _module(act())
    if isinstance(m.activation, BatchTopKActivation):
        m.activation.threshold.fill_(0.4)
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    s = 3.7
    z_scaled, x_hat_scaled = m.encode(s * x), m(s * x)
    m.fold_input_scale_(s)
    torch.testing.assert_close(m.encode(x), z_scaled / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), x_hat_scaled / s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", [lambda: ReLUActivation(), lambda: JumpReLUActivation(10, init_threshold=0.2)],
                         ids=["relu", "jumprelu"])
def test_decoder_norm_folding_is_exact(act):
    m = _module(act())
    with torch.no_grad():
        m.dictionary.W_dec.mul_(torch.linspace(0.5, 3.0, 10)[:, None])
    x = torch.randn(20, 6)
    norms = m.dictionary.W_dec.norm(dim=1)
    z, x_hat = m.encode(x), m(x)
    m.fold_decoder_norms_()
    torch.testing.assert_close(m.dictionary.W_dec.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(m.encode(x), z * norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), x_hat, rtol=1e-5, atol=1e-6)


def test_normalisation_makes_training_scale_equivariant_and_is_folded(small_data):
    """expected_norm normalisation: training on c*X is the same run as on X, and the folded models
    act on raw inputs, so codes and reconstructions scale by exactly c."""
    X = small_data.X[:1024] + 0.5
    a = TopKSAE(n_concepts=64, top_k=3, n_epochs=2, batch_size=128, random_state=0).fit(X)
    b = TopKSAE(n_concepts=64, top_k=3, n_epochs=2, batch_size=128, random_state=0).fit(40.0 * X)
    assert b.normalization_scale_ == pytest.approx(a.normalization_scale_ / 40.0)
    torch.testing.assert_close(b.dictionary_, a.dictionary_, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.transform(40.0 * X[:50]), 40.0 * a.transform(X[:50]), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.reconstruct(40.0 * X[:50]), 40.0 * a.reconstruct(X[:50]), rtol=1e-3, atol=1e-3)
    assert a.score(X) > 0.5 and b.score(40.0 * X) == pytest.approx(a.score(X), abs=1e-4)
    # without normalisation the runs differ
    c = TopKSAE(n_concepts=64, top_k=3, n_epochs=2, batch_size=128, random_state=0, normalize="none").fit(40.0 * X)
    assert not torch.allclose(c.dictionary_, a.dictionary_, atol=1e-2)


def test_auxk_trains_only_dead_latents_from_a_detached_residual():
    torch.manual_seed(0)
    m = SparseAutoencoder(8, 16, TopKActivation(2))
    m.reset_parameters(torch.Generator().manual_seed(0))
    dead = torch.zeros(16, dtype=torch.bool)
    dead[8:12] = True
    with torch.no_grad():
        m.b_enc[:4] = 10.0  # latents 0..3 win every top-2
        m.b_enc[8:12] = 2.0  # the dead ones have positive pre-activations below the winners
    m.train()
    x = torch.randn(32, 8) * 0.1
    out = m.forward_train(x)
    assert set(out.sel.col.tolist()) <= {0, 1, 2, 3}
    loss = auxk_loss(m, x, out, dead, k_aux=3)
    assert float(loss.detach()) > 0
    loss.backward()
    alive = ~dead
    assert float(m.W_enc.grad[alive].abs().max()) == 0.0
    assert float(m.dictionary.W_dec.grad[alive].abs().max()) == 0.0
    assert float(m.b_enc.grad[alive].abs().max()) == 0.0
    assert float(m.W_enc.grad[dead].abs().sum()) > 0 and float(m.dictionary.W_dec.grad[dead].abs().sum()) > 0
    # no dead latents -> exactly zero loss
    assert float(auxk_loss(m, x, m.forward_train(x), torch.zeros(16, dtype=torch.bool), 4)) == 0.0


def test_auxk_teaches_dead_latents_the_unexplained_atoms(small_data):
    """Planted: alive latents hold atoms 0..23, dead latents start random; AuxK alone moves the dead
    latents onto the atoms the model does not explain (24..47)."""
    atoms = small_data.atoms
    g = torch.Generator().manual_seed(123)  # (seed 0 would reproduce the data's atoms)
    m = SparseAutoencoder(32, 48, TopKActivation(3))
    m.reset_parameters(g)
    with torch.no_grad():
        m.dictionary.W_dec[:24] = atoms[:24]
        m.W_enc[:24] = atoms[:24]
        m.b_enc[24:] = -0.2  # dead latents: rarely above the alive ones in the top-k
    dead = torch.zeros(48, dtype=torch.bool)
    dead[24:] = True

    def missing_recovery():
        cos = torch.nn.functional.normalize(m.dictionary.W_dec[24:].detach(), dim=1) @ atoms[24:].T
        return float(cos.max(0).values.mean())

    before = missing_recovery()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    X = small_data.X
    m.train()
    for step in range(60):
        x = X[(step * 128) % 2048:(step * 128) % 2048 + 128]
        out = m.forward_train(x)
        opt.zero_grad()
        auxk_loss(m, x, out, dead, k_aux=16).backward()
        m.dictionary.remove_parallel_grad_()
        opt.step()
        m.dictionary.project_()
    assert before < 0.5
    after = missing_recovery()
    assert after > before + 0.2


def test_dead_latent_tracker_window():
    t = DeadLatentTracker(3, window=100)
    t.update(torch.tensor([True, False, False]), 60)
    assert t.dead_fraction() == 0.0
    t.update(torch.tensor([False, True, False]), 60)
    assert t.dead.tolist() == [False, False, True]


def test_k_annealing_reaches_top_k(tiny_data):
    est = make_tiny("topk", k_anneal=0.5, k_anneal_start=12).fit(tiny_data.X)
    l0 = est.history_["l0"].to_numpy()
    assert l0[0] > 6 and l0[-1] == pytest.approx(3.0)
    assert est.module_.activation.k == 3


def test_sparsity_warmup_ramps_the_penalty(tiny_data):
    est = make_tiny("relu", sparsity_warmup=1.0, log_every=1).fit(tiny_data.X)
    l1 = est.history_["l1"].to_numpy()
    assert l1[0] < l1[-1] and l1[0] < 0.2 * l1[len(l1) // 2] * 2


def test_autocast_nan_fallback_recomputes_in_full_precision(tiny_data):
    X = tiny_data.X * 1e5  # overflows float16 matmuls, fine in float32
    est = make_tiny("topk", n_epochs=1, normalize="none", autocast="float16").fit(X)
    assert est.training_stats_["nan_fallbacks"] > 0
    assert est.training_stats_["skipped_steps"] == 0
    assert bool(torch.isfinite(est.dictionary_).all())
    assert est.history_["nan_fallbacks"].iloc[-1] > 0


def test_bfloat16_autocast_trains(tiny_data):
    est = make_tiny("topk", n_epochs=2, autocast="bfloat16").fit(tiny_data.X)
    assert est.score(tiny_data.X) > 0.3


def test_sparse_and_dense_backends_train_identically(tiny_data):
    a = make_tiny("topk", sparse_backend="sparse", dtype="float64").fit(tiny_data.X)
    b = make_tiny("topk", sparse_backend="dense", dtype="float64").fit(tiny_data.X)
    torch.testing.assert_close(a.dictionary_, b.dictionary_, rtol=1e-9, atol=1e-9)
    assert math.isclose(a.score(tiny_data.X), b.score(tiny_data.X), rel_tol=1e-9)
