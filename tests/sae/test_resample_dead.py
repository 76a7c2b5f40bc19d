"""resample_dead: Anthropic-style resampling of dead latents toward poorly reconstructed inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sae_testing import make_tiny

from sae import BatchTopKSAE, MatryoshkaSAE, TopKSAE
from sae.distributed import fit_distributed
from sae.metrics import ground_truth_recovery
from sae.modules import SparseAutoencoder, TopKActivation
from sae.synthetic import sparse_dictionary_data
from sae.training import DeadLatentTracker


def _planted(atoms: torch.Tensor) -> tuple[SparseAutoencoder, torch.Tensor]:
    """Alive latents 0..23 hold atoms 0..23; latents 24..47 are random and can never be selected."""
    m = SparseAutoencoder(32, 48, TopKActivation(3))
    m.reset_parameters(torch.Generator().manual_seed(123))  # (seed 0 would reproduce the data's atoms)
    with torch.no_grad():
        m.dictionary.W_dec[:24] = atoms[:24]
        m.W_enc[:24] = atoms[:24]
        m.b_enc[24:] = -100.0
    dead = torch.zeros(48, dtype=torch.bool)
    dead[24:] = True
    return m, dead


def _train(m: SparseAutoencoder, X: torch.Tensor, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    m.train()
    for step in range(start, start + steps):
        x = X[(step * 128) % 2048:(step * 128) % 2048 + 128]
        out = m.forward_train(x)
        opt.zero_grad()
        (x - out.x_hat).pow(2).sum(-1).mean().backward()
        m.dictionary.remove_parallel_grad_()
        opt.step()
        m.dictionary.project_()


def _recovery(m: SparseAutoencoder, atoms: torch.Tensor) -> float:
    cos = torch.nn.functional.normalize(m.dictionary.W_dec.detach(), dim=1) @ atoms[24:].T
    return float((cos.max(0).values >= 0.9).float().mean())


def test_resampling_revives_dead_latents_onto_the_unexplained_atoms(small_data):
    """Planted: half the atoms have no live latent. Without resampling the dead latents never fire
    and those atoms stay unrecovered; resampling them toward the worst-reconstructed inputs lets
    plain reconstruction training recover most of them."""
    atoms, X = small_data.atoms, small_data.X
    results = {}
    for resample in (False, True):
        m, dead = _planted(atoms)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        tracker = DeadLatentTracker(48, window=10)
        tracker.since_fired[dead] = 100
        g = torch.Generator().manual_seed(0)
        for r in range(4):  # resample, train, resample whatever is still dead, ...
            if resample:
                n = TopKSAE()._resample_dead(m, opt, X[2048:2560], tracker, g)
                if r == 0:
                    assert n == 24
            fired = torch.zeros(48, dtype=torch.bool)
            with torch.no_grad():
                for i in range(0, 2048, 512):
                    fired |= m.forward_train(X[i:i + 512]).fired
            tracker.since_fired[fired] = 0
            tracker.since_fired[~fired] = 100
            _train(m, X, opt, 40, start=40 * r)
        with torch.no_grad():
            out = m.forward_train(X[:2048])
        results[resample] = (_recovery(m, atoms), int(out.fired[24:].sum()))
    assert results[False][1] == 0 and results[False][0] <= 0.1, results  # never fire, atoms stay missing
    assert results[True][1] >= 20, results  # revived: they fire
    assert results[True][0] >= 0.6, results


def test_resample_closed_form_and_adam_state_reset(small_data):
    atoms, X = small_data.atoms, small_data.X
    m, dead = _planted(atoms)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    _train(m, X, opt, 3)
    # a batch whose rows 5 and 9 carry a large unexplained direction (loss far above the others)
    x = X[:64].clone()
    x[5] += 10.0 * atoms[30]
    x[9] += 8.0 * atoms[40]
    with torch.no_grad():
        e = x - m.forward_train(x).x_hat
    loss = e.pow(2).sum(1)
    big = loss > 20 * loss.median()
    assert big.nonzero().squeeze(1).tolist() == [5, 9]
    tracker = DeadLatentTracker(48, window=10)
    tracker.since_fired[24:26] = 100  # only two dead latents: 24 and 25
    alive = ~tracker.dead
    enc_norm = float(m.W_enc[alive].detach().norm(dim=1).mean())
    sq_mean = opt.state[m.W_enc]["exp_avg_sq"][alive].mean(0).clone()
    n = TopKSAE()._resample_dead(m, opt, x, tracker, torch.Generator().manual_seed(0))
    assert n == 2
    new = m.dictionary.W_dec.detach()[24:26]
    expected = torch.nn.functional.normalize(e[[5, 9]], dim=1)
    # rows are drawn with probability ~ loss^2, so the two large-loss rows win (in either order)
    sims = new @ expected.T
    assert torch.allclose(sims.max(1).values, torch.ones(2), atol=1e-3)
    torch.testing.assert_close(m.W_enc.detach()[24:26], enc_norm * new, rtol=1e-5, atol=1e-6)
    assert float(m.b_enc.detach()[24:26].abs().max()) == 0.0
    assert float(opt.state[m.W_enc]["exp_avg"][24:26].abs().max()) == 0.0
    assert float(opt.state[m.dictionary.W_dec]["exp_avg"][24:26].abs().max()) == 0.0
    torch.testing.assert_close(opt.state[m.W_enc]["exp_avg_sq"][24], sq_mean)
    assert tracker.since_fired[24:26].tolist() == [0, 0]
    # the resampled latents now fire on their rows
    with torch.no_grad():
        fired = m.forward_train(x[[5, 9]]).fired
    assert bool(fired[24:26].all())


def test_fit_resamples_dead_latents_and_reports_them():
    """Planted: uncentred data (a constant offset of norm 3) with a zero initial bias and random
    atoms. About half the latents never fire; resampling revives them, which lowers the held-out
    dead fraction and FVU and raises the fraction of true atoms recovered, for every seed."""
    data = sparse_dictionary_data(n=2560, d=32, n_atoms=48, k=3, seed=0, offset=3.0)
    Xtr, Xte = data.X[:2048], data.X[2048:]
    kw = dict(n_concepts=48, top_k=3, n_epochs=8, batch_size=128, lr=1e-2, auxk_coef=0.0, b_dec_init="zero",
              decoder_init="random", normalize="none", dead_window=512)

    def dead_on(est):
        codes = est.transform(Xte, sparse=True)
        alive = torch.zeros(48, dtype=torch.bool)
        alive[codes.indices[codes.values > 0]] = True
        return float((~alive).float().mean())

    for seed in (0, 1):
        plain = TopKSAE(random_state=seed, **kw).fit(Xtr)
        res = TopKSAE(random_state=seed, resample_dead=16, **kw).fit(Xtr)
        assert "resampled" not in plain.history_.columns
        assert res.training_stats_["resampled"] > 0
        assert res.history_["resampled"].iloc[-1] == res.training_stats_["resampled"]
        assert dead_on(plain) > 0.3 and dead_on(res) < 0.1, seed
        assert 1 - res.score(Xte) < 0.95 * (1 - plain.score(Xte)), seed
        rec_plain = ground_truth_recovery(plain.dictionary_, data.atoms)["recovery"]
        rec_res = ground_truth_recovery(res.dictionary_, data.atoms)["recovery"]
        assert rec_res > rec_plain + 0.05, (seed, rec_plain, rec_res)


class _Interrupt(Exception):
    pass


def test_resume_with_resampling_matches_uninterrupted(tiny_data, tmp_path):
    X = tiny_data.X
    kw = dict(n_concepts=128, resample_dead=3, dead_window=64, auxk_coef=0.0, checkpoint_every=3)
    full = make_tiny("topk", **kw).fit(X)
    assert full.training_stats_["resampled"] > 0

    def stop_at_10(est, step, metrics):
        if step == 10:
            raise _Interrupt

    ck = tmp_path / "ck"
    with pytest.raises(_Interrupt):
        make_tiny("topk", checkpoint_dir=ck, **kw).fit(X, callbacks=[stop_at_10])
    assert json.loads((ck / "latest.json").read_text())["step"] == 9
    resumed = make_tiny("topk", checkpoint_dir=ck, **kw).fit(X, resume=True)
    for k, v in full.module_.state_dict().items():
        torch.testing.assert_close(resumed.module_.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    cols = [c for c in full.history_.columns if c != "time_s"]
    np.testing.assert_allclose(resumed.history_[cols].to_numpy(), full.history_[cols].to_numpy(), rtol=0, atol=1e-6)
    assert resumed.training_stats_["resampled"] == full.training_stats_["resampled"]


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE, MatryoshkaSAE])
@pytest.mark.parametrize("bad", [-1, "10", True])
def test_invalid_resample_dead_is_refused(cls, bad, tiny_data):
    with pytest.raises(ValueError, match="resample_dead must be None, or a number of steps"):
        cls(n_concepts=32, top_k=3, resample_dead=bad).fit(tiny_data.X)


def test_fit_distributed_refuses_resampling(tiny_data, monkeypatch):
    import sae.distributed as sd

    monkeypatch.setattr(sd.dist, "is_available", lambda: True)
    monkeypatch.setattr(sd.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sd.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(sd.dist, "get_rank", lambda group=None: 0)
    with pytest.raises(ValueError, match=r"resample_dead=8\) is not supported by fit_distributed"):
        fit_distributed(TopKSAE(n_concepts=32, top_k=3, resample_dead=8), tiny_data.X)
