"""encoder_decay: decoupled decay of the encoder toward the tied encoder (the decoder transpose)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sae_testing import make_tiny

from sae import BatchTopKSAE, MatryoshkaSAE, TopKSAE
from sae.modules import FreeDictionary, SparseAutoencoder, TopKActivation
from sae.synthetic import sparse_dictionary_data


def _module(unit_norm: bool = True) -> SparseAutoencoder:
    m = SparseAutoencoder(8, 16, TopKActivation(2), FreeDictionary(16, 8, unit_norm=unit_norm))
    m.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.W_enc.copy_(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))
    return m


def test_decay_encoder_closed_form():
    m = _module()
    w0, d = m.W_enc.detach().clone(), m.get_dictionary().detach().clone()
    m.decay_encoder_(0.25)
    torch.testing.assert_close(m.W_enc.detach(), w0 + 0.25 * (d - w0), rtol=0, atol=1e-6)
    m.decay_encoder_(0.0)  # no-op
    torch.testing.assert_close(m.W_enc.detach(), w0 + 0.25 * (d - w0), rtol=0, atol=1e-6)
    m.decay_encoder_(7.0)  # clipped to 1: tied
    torch.testing.assert_close(m.W_enc.detach(), d, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.get_dictionary().detach(), d, rtol=0, atol=0)  # the decoder is untouched


def test_tied_encoder_inverts_a_lone_atom_of_any_norm():
    m = _module(unit_norm=False)
    with torch.no_grad():
        m.dictionary.W_dec.mul_(torch.linspace(0.5, 3.0, 16)[:, None])  # atoms of different norms
    m.decay_encoder_(1.0)
    d = m.get_dictionary().detach()
    x = 1.7 * d  # sample i = 1.7 * atom i
    pre = m.pre_activations(x).detach()  # b_enc = b_dec = 0
    torch.testing.assert_close(pre.diagonal(), torch.full((16,), 1.7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("warmup", [0, 2])
def test_one_training_step_pulls_by_scheduled_lr_times_decay_times_sqrt_d(tiny_data, warmup):
    """One step (n = batch_size): decayed fit == free fit's encoder moved toward the same atoms by
    r = lr * lr_factor * encoder_decay * sqrt(d) (lr_factor = 1/2 at step 0 with a 2-step warm-up)."""
    X = tiny_data.X[:64].double()
    kw = dict(n_concepts=32, top_k=3, n_epochs=1, batch_size=64, lr=1e-2, lr_warmup=warmup, lr_decay=0,
              normalize="none", random_state=0, dtype="float64")
    free = TopKSAE(encoder_decay=0.0, **kw).fit(X)
    pulled = TopKSAE(encoder_decay=0.3, **kw).fit(X)
    assert free.training_stats_["n_steps"] == 1
    torch.testing.assert_close(pulled.dictionary_, free.dictionary_, rtol=0, atol=1e-12)
    r = 1e-2 * (0.5 if warmup else 1.0) * 0.3 * math.sqrt(16)
    w0 = free.module_.W_enc.detach()
    expected = w0 + r * (free.dictionary_ - w0)
    torch.testing.assert_close(pulled.module_.W_enc.detach(), expected, rtol=0, atol=1e-12)


def test_a_very_strong_decay_trains_a_tied_sae(tiny_data):
    tied = make_tiny("topk", encoder_decay=1e6).fit(tiny_data.X)
    free = make_tiny("topk").fit(tiny_data.X)
    torch.testing.assert_close(tied.module_.W_enc.detach(), tied.dictionary_, rtol=0, atol=1e-6)
    assert float((free.module_.W_enc.detach() - free.dictionary_).abs().max()) > 1e-2
    assert tied.score(tiny_data.X) > 0.3  # still a working autoencoder


def test_encoder_decay_narrows_the_generalisation_gap_on_repeated_small_data():
    """Planted: 1,024 training rows from 128 atoms (d = 64), 30 epochs. The free encoder over-fits
    the training rows (held-out FVU about twice the training FVU); the pull lowers the held-out FVU
    and narrows the gap, for every seed."""
    data = sparse_dictionary_data(n=1024 + 2048, d=64, n_atoms=128, k=4, seed=1)
    Xtr, Xte = data.X[:1024], data.X[1024:]
    kw = dict(n_concepts=128, top_k=16, n_epochs=30, batch_size=64, lr=5e-3, lr_warmup=0.0, lr_decay=0.3)
    for seed in (0, 1):
        free = TopKSAE(random_state=seed, **kw).fit(Xtr)
        pulled = TopKSAE(random_state=seed, encoder_decay=0.125, **kw).fit(Xtr)
        free_test, free_train = 1 - free.score(Xte), 1 - free.score(Xtr)
        pulled_test, pulled_train = 1 - pulled.score(Xte), 1 - pulled.score(Xtr)
        assert free_test > 1.5 * free_train  # the planted over-fitting is there
        assert pulled_test < 0.98 * free_test, (seed, free_test, pulled_test)
        assert pulled_test - pulled_train < free_test - free_train, seed


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE, MatryoshkaSAE])
@pytest.mark.parametrize("bad", [-0.1, "0.1", True, float("nan")])
def test_invalid_encoder_decay_is_refused(cls, bad, tiny_data):
    with pytest.raises(ValueError, match=r"encoder_decay must be a number >= 0 \(0 disables"):
        cls(n_concepts=32, top_k=3, encoder_decay=bad).fit(tiny_data.X)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_resume_with_encoder_decay_matches_uninterrupted(name, tiny_data, tmp_path):
    X = tiny_data.X
    full = make_tiny(name, encoder_decay=0.5, checkpoint_every=3).fit(X)

    def stop_at_9(est, step, metrics):
        if step == 9:
            raise _Interrupt

    ck = tmp_path / "ck"
    with pytest.raises(_Interrupt):
        make_tiny(name, encoder_decay=0.5, checkpoint_every=3, checkpoint_dir=ck).fit(X, callbacks=[stop_at_9])
    assert json.loads((ck / "latest.json").read_text())["step"] == 9
    resumed = make_tiny(name, encoder_decay=0.5, checkpoint_every=3, checkpoint_dir=ck).fit(X, resume=True)
    for k, v in full.module_.state_dict().items():
        torch.testing.assert_close(resumed.module_.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    cols = [c for c in full.history_.columns if c != "time_s"]
    np.testing.assert_allclose(resumed.history_[cols].to_numpy(), full.history_[cols].to_numpy(), rtol=0, atol=1e-6)
    # the option changes the result (so the comparison above is not vacuous)
    plain = make_tiny(name).fit(X)
    assert float((plain.module_.W_enc - full.module_.W_enc).detach().abs().max()) > 1e-4
