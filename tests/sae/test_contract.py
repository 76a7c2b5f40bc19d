"""Every SAE variant through the estimator contract.

fit returns self; NotFittedError before fit; wrong feature count names both numbers; clone;
save/load round trip; device propagation; resume after an interruption reproduces the
uninterrupted run within 1e-6.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import sae as sae_pkg
from sae import SparseCodes

from sae_testing import TINY, make_tiny

VARIANTS = sorted(TINY)


@pytest.mark.parametrize("name", VARIANTS)
def test_fit_returns_self_and_sets_fitted_attributes(name, tiny_data):
    est = make_tiny(name, n_epochs=1)
    assert est.fit(tiny_data.X) is est
    assert est.dictionary_.shape == (32, 16)
    assert est.n_features_in_ == 16
    assert not est.history_.empty and {"step", "loss", "fvu", "l0", "dead_fraction", "lr"} <= set(est.history_.columns)
    assert est.history_["step"].iloc[-1] == est.training_stats_["n_steps"]
    # the fitted model reconstructs better than the mean (explained variance > 0)
    assert est.score(tiny_data.X) > 0.0


@pytest.mark.parametrize("name", VARIANTS)
def test_not_fitted_errors(name, tiny_data, tmp_path):
    est = make_tiny(name)
    for call in (
        lambda: est.transform(tiny_data.X),
        lambda: est.inverse_transform(np.zeros((2, 32))),
        lambda: est.score(tiny_data.X),
        lambda: est.save(tmp_path / "x"),
        lambda: est.reconstruct(tiny_data.X),
    ):
        with pytest.raises(NotFittedError, match=f"This {type(est).__name__} instance is not fitted yet"):
            call()


@pytest.mark.parametrize("name", VARIANTS)
def test_wrong_feature_count_names_both_numbers(name, fitted_tiny):
    est = fitted_tiny[name]
    cls = type(est).__name__
    with pytest.raises(ValueError, match=f"X has 7 features, but {cls} is expecting 16 features as input"):
        est.transform(torch.zeros(3, 7))
    with pytest.raises(ValueError, match=f"X has 7 features, but {cls} is expecting 16 features as input"):
        est.score(np.zeros((3, 7)))
    with pytest.raises(ValueError, match=f"codes have 5 columns, but {cls} has 32 concepts"):
        est.inverse_transform(np.zeros((3, 5)))


@pytest.mark.parametrize("name", VARIANTS)
def test_clone_and_params(name, fitted_tiny):
    est = fitted_tiny[name]
    c = clone(est)
    assert c.get_params() == est.get_params()
    assert not hasattr(c, "module_")
    c.set_params(n_epochs=5)
    assert c.n_epochs == 5 and est.n_epochs == 2


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_round_trip(name, fitted_tiny, tiny_data, tmp_path):
    est = fitted_tiny[name]
    path = est.save(tmp_path / name)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "history.csv", "weights.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architecture"] == est._architecture and cfg["d_in"] == 16 and cfg["n_concepts"] == 32
    assert cfg["normalization"]["folded"] is True and cfg["version"]
    loaded = sae_pkg.load(path)
    assert type(loaded) is type(est)
    X = tiny_data.X[:40]
    torch.testing.assert_close(loaded.transform(X), est.transform(X), rtol=0, atol=0)
    torch.testing.assert_close(loaded.reconstruct(X), est.reconstruct(X), rtol=0, atol=0)
    torch.testing.assert_close(loaded.dictionary_, est.dictionary_)
    assert loaded.get_params() == est.get_params()
    assert len(loaded.history_) == len(est.history_)


@pytest.mark.parametrize("name", VARIANTS)
def test_output_types_follow_input(name, fitted_tiny, tiny_data):
    est = fitted_tiny[name]
    X = tiny_data.X[:10]
    assert isinstance(est.transform(X.numpy()), np.ndarray)
    z = est.transform(X)
    assert isinstance(z, torch.Tensor)
    sp = est.transform(X, sparse=True)
    assert isinstance(sp, SparseCodes)
    # the sparse form holds exactly the dense codes
    torch.testing.assert_close(sp.to_dense(32), z)
    # inverse_transform of dense and of sparse codes agree with reconstruct (sparse part for structured)
    if name != "structured":
        torch.testing.assert_close(est.inverse_transform(z), est.reconstruct(X), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(est.inverse_transform(sp), est.inverse_transform(z), rtol=1e-5, atol=1e-5)


def _devices():
    devs = ["cpu", torch.device("cpu")]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("device", _devices(), ids=str)
def test_device_propagation(name, device, tiny_data, tmp_path):
    est = make_tiny(name, n_epochs=1, device=device).fit(tiny_data.X)
    dev = torch.device(device)
    assert all(p.device.type == dev.type for p in est.module_.parameters())
    assert est.dictionary_.device.type == dev.type
    X = tiny_data.X[:5]
    assert est.transform(X).device == X.device  # results come back where the input lives
    loaded = sae_pkg.load(est.save(tmp_path / "m"), device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.module_.parameters())
    est.to("cpu")
    assert est.module_.W_enc.device.type == "cpu"


def test_unavailable_or_invalid_device_raises(tiny_data):
    with pytest.raises(ValueError, match="is not a valid torch device"):
        make_tiny("topk", device="gpu0").fit(tiny_data.X)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            make_tiny("topk", device="cuda").fit(tiny_data.X)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", VARIANTS)
def test_resume_matches_uninterrupted(name, tiny_data, tmp_path):
    X = tiny_data.X
    full = make_tiny(name, n_epochs=2, checkpoint_every=3).fit(X)

    def stop_at(n):
        def cb(est, step, metrics):
            if step == n:
                raise _Interrupt

        return cb

    ck = tmp_path / "ck"
    killed = make_tiny(name, n_epochs=2, checkpoint_every=3, checkpoint_dir=ck)
    with pytest.raises(_Interrupt):
        killed.fit(X, callbacks=[stop_at(9)])  # mid-epoch (8 steps per epoch)
    assert not hasattr(killed, "module_")
    assert json.loads((ck / "latest.json").read_text())["step"] == 9
    resumed = make_tiny(name, n_epochs=2, checkpoint_every=3, checkpoint_dir=ck).fit(X, resume=True)
    for k, v in full.module_.state_dict().items():
        torch.testing.assert_close(resumed.module_.state_dict()[k], v, rtol=0, atol=1e-6, msg=f"{name}: {k}")
    cols = [c for c in full.history_.columns if c != "time_s"]
    np.testing.assert_allclose(resumed.history_[cols].to_numpy(), full.history_[cols].to_numpy(), rtol=0, atol=1e-6)


def test_resume_without_checkpoint_starts_fresh_and_resume_needs_a_directory(tiny_data, tmp_path):
    a = make_tiny("topk", n_epochs=1).fit(tiny_data.X)
    b = make_tiny("topk", n_epochs=1).fit(tiny_data.X, resume=True, checkpoint_dir=tmp_path / "empty")
    torch.testing.assert_close(a.dictionary_, b.dictionary_)
    with pytest.raises(ValueError, match="needs a checkpoint directory"):
        make_tiny("topk").fit(tiny_data.X, resume=True)


def test_resume_with_changed_settings_is_refused(tiny_data, tmp_path):
    make_tiny("topk", n_epochs=1, checkpoint_dir=tmp_path).fit(tiny_data.X)
    with pytest.raises(ValueError, match="field 'total_steps' is 8, but this fit would run 16"):
        make_tiny("topk", n_epochs=2, checkpoint_dir=tmp_path).fit(tiny_data.X, resume=True)
    with pytest.raises(ValueError, match="field 'architecture' is 'topk'"):
        make_tiny("relu", n_epochs=1, checkpoint_dir=tmp_path).fit(tiny_data.X, resume=True)
    with pytest.raises(ValueError, match="field 'd_in' is 16, but X has 8 features"):
        make_tiny("topk", n_epochs=1, checkpoint_dir=tmp_path).fit(tiny_data.X[:, :8], resume=True)


def test_seeds_reproduce(tiny_data):
    a = make_tiny("topk", n_epochs=1, random_state=5).fit(tiny_data.X)
    b = make_tiny("topk", n_epochs=1, random_state=5).fit(tiny_data.X)
    c = make_tiny("topk", n_epochs=1, random_state=6).fit(tiny_data.X)
    torch.testing.assert_close(a.dictionary_, b.dictionary_, rtol=0, atol=0)
    assert not torch.allclose(a.dictionary_, c.dictionary_)
    d = make_tiny("topk", n_epochs=1, random_state=None).fit(tiny_data.X)
    assert isinstance(d.random_state_, int)


@pytest.mark.parametrize("name", VARIANTS)
def test_repr_html(name, fitted_tiny):
    est = fitted_tiny[name]
    html = est._repr_html_()
    assert type(est).__name__ in html and "fitted" in html and "n_concepts" in html and "train_fvu" in html
    assert "not fitted" in make_tiny(name)._repr_html_()
